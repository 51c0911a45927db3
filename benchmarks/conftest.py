import pytest
import torch

# Ratios from benchmarks that time several methods within each round (see
# bench_fisher.test_fisher_encoder_interleaved), printed after pytest-benchmark's tables.
INTERLEAVED_RATIOS = {}


def pytest_configure(config):
    torch.manual_seed(0)


@pytest.fixture
def interleaved_ratios():
    return INTERLEAVED_RATIOS


def pytest_terminal_summary(terminalreporter):
    if not INTERLEAVED_RATIOS:
        return
    terminalreporter.section("interleaved rounds: median over rounds of time / floor's time in the same round")
    for case, ratios in INTERLEAVED_RATIOS.items():
        terminalreporter.write_line(f"{case}: " + ", ".join(f"{m} {r:.2f}" for m, r in ratios.items()))
