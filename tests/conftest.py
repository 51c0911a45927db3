import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(1234)


def odd_tensor(*shape, dtype=torch.float32, scale=1.0):
    """Random values that are never all zeros, spread over several quantization steps."""
    return (torch.randn(*shape) * scale).to(dtype)
