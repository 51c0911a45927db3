"""Child process of tests/test_atomic.py: saves a numbered state to PATH over and over,
printing the number after each save returns, until it is killed.

    python tests/_atomic_writer.py torch|quant_config|fisher PATH
"""
import pathlib
import sys
import time

import torch
from torch import nn

SIZE = 1 << 22  # 4 Mi float32 = 16 MiB: a write takes long enough to be killed inside it


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

        # JSON text is written in one quick call; emulate a slow disk (64 KiB chunks, 2 ms
        # apart) so that the kill can land inside the write rather than in json.dumps.
        def slow_write_text(self, data, encoding=None, errors=None, newline=None):
            with open(self, "w", encoding=encoding, errors=errors, newline=newline) as f:
                for start in range(0, len(data), 1 << 16):
                    f.write(data[start:start + (1 << 16)])
                    f.flush()
                    time.sleep(0.002)
            return len(data)

        pathlib.Path.write_text = slow_write_text

        cfg = QuantConfig(layers={f"block{k}.*": {"w_bits": 2 + k % 7} for k in range(20000)})

        def save(i):
            cfg.layers.pop(f"marker{i - 1}", None)
            cfg.layers[f"marker{i}"] = {"w_bits": 8}
            cfg.save(path)
        return save
    if kind == "fisher":
        from fqdetr.fisher import FisherCollector

        fc = FisherCollector(nn.Sequential(nn.Linear(2048, SIZE // 2048)))

        def save(i):
            fc.sums["0"].fill_(i)
            fc.counts["0"] = i + 1
            fc.save(path)
        return save
    raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    save = writer(*sys.argv[1:3])
    for i in range(10**9):
        save(i)
        print(i, flush=True)
