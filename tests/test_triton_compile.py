"""Every Triton kernel variant our launchers would launch compiles for sm_90 and sm_80,
here without a GPU (tests/_triton_compile_check.py drives the launchers with the launch
replaced by an ahead-of-time compile). The interpreter that the other tests use never
compiles, so it cannot catch code that only the compiler rejects."""
import importlib.util
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_launched_variant_compiles_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = os.path.join(os.path.dirname(__file__), "_triton_compile_check.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.splitlines()
    assert lines[-1].startswith(f"{len(lines) - 1} variants compiled for sm_90, sm_80")
    int_paths = [line for line in lines if "INT_DOT=True" in line]
    # The exact integer path must reach the tensor cores (int8 mma / wgmma) on both targets.
    assert len(int_paths) >= 2 and all(line.count("tensor cores yes") == 2 for line in int_paths)
    assert sum(line.startswith("_fisher_kernel") for line in lines) >= 4
