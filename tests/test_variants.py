"""The checks shared by `SSAMTrainingArguments` and `SSAMOptimizer`: both refuse the same inputs."""

import pytest
import torch

from hf_ssam import SSAMOptimizer
from hf_ssam.variants import check_sam_config


@pytest.mark.parametrize("renormalize", [0, 1, "true"])
def test_renormalize_zero_is_not_false(renormalize):
    """`renormalize=0` compares equal to False: it must be refused, not silently turn ssam into usam."""
    with pytest.raises(ValueError, match=r"renormalize=.* is invalid"):
        check_sam_config("ssam", 0.05, renormalize, 0.01)
    with pytest.raises(ValueError, match=r"renormalize=.* is invalid"):
        SSAMOptimizer([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, renormalize=renormalize)


@pytest.mark.parametrize("name", ["rho", "asam_eta"])
def test_booleans_are_not_numbers(name):
    kwargs = {"rho": 0.05, "asam_eta": 0.01, name: True}
    with pytest.raises(ValueError, match=rf"{name}=True is invalid"):
        check_sam_config("asam", kwargs["rho"], None, kwargs["asam_eta"])
    with pytest.raises(ValueError, match=rf"{name}=True is invalid"):
        SSAMOptimizer([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("text", ["0.1", "5e-2", "0", "-0.1", "nan", "inf"])
@pytest.mark.parametrize("name", ["rho", "asam_eta"])
def test_numeric_strings_are_converted_by_the_arguments_then_checked_like_numbers(name, text):
    """The arguments read YAML and the command line, so they convert; the optimizer refuses strings, saying so."""
    from hf_ssam import SSAMTrainingArguments

    def arguments(value):
        return SSAMTrainingArguments(output_dir="o", report_to="none", use_cpu=True, sam_variant="asam",
                                     **{f"sam_{name}": value})  # fmt: skip

    def optimizer(value):
        return SSAMOptimizer([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, variant="asam",
                             **{name: value})  # fmt: skip

    number = float(text)
    valid = 0 <= number < float("inf")
    if valid:
        assert getattr(arguments(text), f"sam_{name}") == number and optimizer(number).defaults[name] == number
    else:
        with pytest.raises(ValueError, match=rf"sam_{name}={number!r} is invalid; it must be a finite number >= 0\."):
            arguments(text)
        with pytest.raises(ValueError, match=rf"^{name}={number!r} is invalid; it must be a finite number >= 0\."):
            optimizer(number)
    with pytest.raises(ValueError, match=rf"^{name}='{text}' is invalid; .* >= 0 \(an int or float, not str\)\."):
        optimizer(text)
