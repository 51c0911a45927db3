"""Child process of tests/test_atomic.py: saves a numbered state to PATH over and over,
printing the number after each save returns. Save number PAUSE_AT stops inside its write, just
before the temporary file would be renamed over PATH, prints "paused" and waits to be killed.

    python tests/_atomic_writer.py torch|quant_config|fisher PATH PAUSE_AT
"""
import os
import sys
import time

import torch
from torch import nn

SIZE = 1 << 16  # elements of the saved tensor, checked one by one by the test


def writer(kind, path):
    if kind == "torch":
        from fqdetr.io import atomic_torch_save

        payload = {"model": {"w": torch.empty(SIZE)}, "step": 0}

        def save(i):
            payload["model"]["w"].fill_(i)
            payload["step"] = i
            atomic_torch_save(payload, path)
        return save
    if kind == "quant_config":
        from fqdetr.quant import QuantConfig

        cfg = QuantConfig(layers={f"block{k}.*": {"w_bits": 2 + k % 7} for k in range(200)})

        def save(i):
            cfg.layers.pop(f"marker{i - 1}", None)
            cfg.layers[f"marker{i}"] = {"w_bits": 8}
            cfg.save(path)
        return save
    if kind == "fisher":
        from fqdetr.fisher import FisherCollector

        fc = FisherCollector(nn.Sequential(nn.Linear(256, SIZE // 256)))

        def save(i):
            fc.sums["0"].fill_(i)
            fc.counts["0"] = i + 1
            fc.save(path)
        return save
    raise SystemExit(f"unknown kind {kind!r}")


def pause_before_rename():
    """Replaces os.replace with one that reports and waits forever: the state a kill between a
    write's last byte and its rename leaves, deterministically."""
    def paused_replace(src, dst):
        print("paused", flush=True)
        while True:
            time.sleep(60)
    os.replace = paused_replace


if __name__ == "__main__":
    torch.set_num_threads(1)
    kind, path, pause_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    save = writer(kind, path)
    for i in range(pause_at + 1):
        if i == pause_at:
            pause_before_rename()
        save(i)
        print(i, flush=True)
