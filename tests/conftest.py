import os

import pytest
import torch
from hypothesis import settings

# Property tests (tests/test_properties.py). "ci", the default: the same 60 examples per test on
# every run, so that `make test` passes or fails reproducibly (randomised examples once failed the
# tenth of ten consecutive runs, on a test tolerance since fixed). "explore": fresh random
# examples, many more of them, to look for such cases:
#     HYPOTHESIS_PROFILE=explore pytest tests/test_properties.py
settings.register_profile("ci", max_examples=60, derandomize=True)
settings.register_profile("explore", max_examples=1000, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(1234)


def odd_tensor(*shape, dtype=torch.float32, scale=1.0):
    """Random values that are never all zeros, spread over several quantization steps."""
    return (torch.randn(*shape) * scale).to(dtype)
