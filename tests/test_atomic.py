"""A process killed (SIGKILL) in the middle of writing a checkpoint, a quantization config or a
Fisher state leaves the previous complete file in place: every writer goes through a temporary
file renamed over the destination (atomic_torch_save, QuantConfig.save, FisherCollector.save)."""
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fqdetr.fisher import FisherCollector
from fqdetr.quant import QuantConfig

WRITER = Path(__file__).with_name("_atomic_writer.py")
SIZE = 1 << 16  # as in _atomic_writer.py
PAUSE_AT = 2  # the save the writer is killed in, after two complete ones


def _saved_step(kind, path):
    """Loads ``path`` and returns the save number it holds, checking the file is complete."""
    if kind == "torch":
        state = torch.load(path, weights_only=True)
        w = state["model"]["w"]
        assert w.numel() == SIZE and bool((w == state["step"]).all())
        return state["step"]
    if kind == "quant_config":
        cfg = QuantConfig.load(path)
        markers = [k for k in cfg.layers if k.startswith("marker")]
        assert len(cfg.layers) == 201 and len(markers) == 1
        return int(markers[0][len("marker"):])
    state = FisherCollector.load(path)
    step = state.counts["0"] - 1
    assert state.sums["0"].numel() == SIZE and bool((state.sums["0"] == step).all())
    return step


def _lines(proc):
    """A queue receiving the writer's stdout lines (None at its end), read in a thread so that a
    writer that never pauses fails the test by a timeout instead of hanging it."""
    lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return lines


def _kill_in_save(kind, folder):
    """Runs a writer until it pauses inside save PAUSE_AT (its temporary written, not yet
    renamed), SIGKILLs it there and returns (the lines it printed, its exit code)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(WRITER), kind, str(folder / "state"), str(PAUSE_AT)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines, printed = _lines(proc), []
        while not printed or printed[-1] not in ("paused", None):
            try:
                printed.append(lines.get(timeout=120))
            except queue.Empty:
                pytest.fail(f"the writer printed nothing for 120 s after {printed}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return printed, proc.returncode


@pytest.mark.parametrize("kind", ["torch", "quant_config", "fisher"])
def test_killed_writer_leaves_previous_file_intact(kind, tmp_path):
    printed, returncode = _kill_in_save(kind, tmp_path)
    # A writer that never renames (it writes in place) prints "2" instead of pausing.
    assert printed == ["0", "1", "paused"] and returncode == -signal.SIGKILL
    # The destination still holds the last complete save, untouched by the killed one ...
    assert _saved_step(kind, tmp_path / "state") == PAUSE_AT - 1
    # ... whose bytes were all written, to a temporary that never replaced it.
    temporaries = [p for p in tmp_path.iterdir() if p.name != "state"]
    assert len(temporaries) == 1 and temporaries[0].name.endswith(".tmp")
    assert _saved_step(kind, temporaries[0]) == PAUSE_AT
