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
