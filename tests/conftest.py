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


def pytest_sessionstart(session):
    """The kernel tests skip a backend that did not load, so a broken build would pass as skips:
    the compiled CPU module must import and triton be installed (the test files run it under
    TRITON_INTERPRET=1). FQ_ALLOW_MISSING_BACKENDS=1 runs without them."""
    if os.environ.get("FQ_ALLOW_MISSING_BACKENDS") == "1":
        return
    import importlib.util

    from fqkernels import _ext
    missing = {"fqkernels._cpu": _ext.CPU_IMPORT_ERROR} if _ext._cpu is None else {}
    if importlib.util.find_spec("triton") is None:
        missing["triton"] = "not installed"
    if missing:
        pytest.exit(f"backends did not load: {missing}; rebuild (make build) or set FQ_ALLOW_MISSING_BACKENDS=1 "
                    f"to run with their tests skipped", returncode=3)


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(1234)


def odd_tensor(*shape, dtype=torch.float32, scale=1.0):
    """Random values that are never all zeros, spread over several quantization steps."""
    return (torch.randn(*shape) * scale).to(dtype)
