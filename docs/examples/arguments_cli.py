"""SSAMTrainingArguments from the command line or a YAML file, through HfArgumentParser."""

import sys
import tempfile
from pathlib import Path

from transformers import HfArgumentParser

from hf_ssam import SSAMTrainingArguments

parser = HfArgumentParser(SSAMTrainingArguments)

# python train.py --output_dir outputs/asam --sam_variant asam --sam_rho 0.5 --sam_renormalize true
cli = sys.argv[1:] or [
    "--output_dir", "outputs/asam",
    "--sam_variant", "asam",
    "--sam_rho", "0.5",
    "--sam_renormalize", "true",  # ASAM + the SSAM renormalization
    "--report_to", "none",
]  # fmt: skip
(args,) = parser.parse_args_into_dataclasses(cli)
print(args.sam_variant, args.sam_rho, args.sam_renormalize)

# python train.py config.yaml   (written to a temporary folder here)
with tempfile.TemporaryDirectory() as folder:
    config = Path(folder) / "config.yaml"
    config.write_text(
        "output_dir: outputs/vit-ssam\n"
        "learning_rate: 3.0e-4\n"
        "weight_decay: 0.3\n"
        "sam_variant: ssam\n"
        "sam_rho: 0.2\n"
        "sam_sync_ascent: false\n"
        "report_to: none\n"
    )
    (args,) = parser.parse_yaml_file(config)
print(args.sam_variant, args.sam_rho, args.learning_rate)
