"""A process killed (SIGKILL) in the middle of writing a checkpoint, a quantization config or a
Fisher state leaves the previous complete file in place: every writer goes through a temporary
file renamed over the destination (atomic_torch_save, QuantConfig.save, FisherCollector.save)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fqdetr.fisher import FisherCollector
from fqdetr.quant import QuantConfig

WRITER = Path(__file__).with_name("_atomic_writer.py")


def _check_intact(kind, path):
    """Loads ``path`` and returns the iteration number it holds, checking it is complete."""
    if kind == "torch":
        state = torch.load(path, weights_only=True)
        w = state["model"]["w"]
        assert w.numel() == 1 << 22 and bool((w == state["step"]).all())
        return state["step"]
    if kind == "quant_config":
        cfg = QuantConfig.load(path)
        markers = [k for k in cfg.layers if k.startswith("marker")]
        assert len(cfg.layers) == 20001 and len(markers) == 1
        return int(markers[0][len("marker"):])
    state = FisherCollector.load(path)
    step = state.counts["0"] - 1
    assert state.sums["0"].numel() == 1 << 22 and bool((state.sums["0"] == step).all())
    return step


def _temporaries(folder, name):
    return [p for p in folder.iterdir() if p.name != name]


def _stat(path):
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _kill_mid_write(kind, folder):
    """Starts a writer, lets it finish two saves, then SIGKILLs it as soon as the next save
    shows on disk: a temporary file appears, or the destination itself changes (a writer that
    writes in place is thus killed half-way through). Returns (the last save the writer
    reported, whether a temporary was left, the exit code)."""
    path = folder / "state"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(WRITER), kind, str(path)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        done = [int(proc.stdout.readline()) for _ in range(2)]  # two complete saves
        before = _stat(path)
        deadline = time.monotonic() + 60
        while not _temporaries(folder, path.name) and _stat(path) == before:
            assert time.monotonic() < deadline, "the writer did not start another save within 60 s"
            time.sleep(0.0002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reported = done + [int(line) for line in proc.stdout.read().split()]
    return reported[-1], bool(_temporaries(folder, path.name)), proc.returncode


@pytest.mark.parametrize("kind", ["torch", "quant_config", "fisher"])
def test_killed_writer_leaves_previous_file_intact(kind, tmp_path):
    for attempt in range(3):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        last_reported, mid_write, returncode = _kill_mid_write(kind, folder)
        assert returncode == -signal.SIGKILL
        # The destination always holds one complete save: the last one the writer reported,
        # or the next if the kill fell between its rename and its print.
        step = _check_intact(kind, folder / "state")
        assert step in (last_reported, last_reported + 1)
        if mid_write:
            # What was being written stayed a temporary; it never replaced the destination.
            assert all(p.name.endswith(".tmp") for p in _temporaries(folder, "state"))
            return
    pytest.fail("never killed inside a write (3 attempts): the writes are too fast to catch")
