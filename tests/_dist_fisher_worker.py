"""Worker for tests/test_distributed.py: Fisher traces of a small quantized transformer block
over a fixed set of samples, sharded across the ranks of a torchrun launch (or all samples
in a plain single process), all-reduced, saved per rank with FisherCollector.save; then two
DistributedDataParallel SGD steps of a small MLP, the weights saved per rank.

    torchrun --nproc_per_node 2 tests/_dist_fisher_worker.py OUT_DIR
    python tests/_dist_fisher_worker.py OUT_DIR          # single process, same code path
"""
import faulthandler
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fqdetr.engine import distributed as fd
from fqdetr.engine.loader import ResumableSampler
from fqdetr.fisher import FisherCollector
from fqdetr.quant import QuantConfig, quantize_model

NUM_SAMPLES, BATCH = 7, 2  # odd: the ranks get 4 and 3 samples (unpadded shards)


class Block(nn.Module):
    """Linear -> (batch-first) MHA -> FFN -> head on tokens [N, T, C]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + self.ffn(t)
        return self.head(t)


def build():
    """The same model and data in every process (fixed seeds; scales initialised on all samples)."""
    torch.manual_seed(0)
    x, target = torch.randn(NUM_SAMPLES, 5, 6), torch.randn(NUM_SAMPLES, 5, 3)
    model = quantize_model(Block(), QuantConfig(w_bits=4, a_bits=8)).eval()
    with torch.no_grad():
        model(x)  # activation scales from the whole set, identical on every rank
    return model, TensorDataset(x, target)


def collect():
    """Returns (collector after all-reduce, samples this process saw itself)."""
    model, data = build()
    sampler = ResumableSampler(data, shuffle=True, seed=3, rank=fd.rank(), world=fd.world_size(), pad=False)
    sampler.set_epoch(0)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    local = 0
    with FisherCollector(model) as fc:
        for x, target in loader:
            fc.backward((model(x) - target).square().sum(dim=(1, 2)))
            local += x.shape[0]
    fd.all_reduce_fisher(fc)
    return fc, local


def ddp_data():
    torch.manual_seed(1)
    return TensorDataset(torch.randn(8, 6), torch.randn(8, 3))


def ddp_model():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def ddp_train(steps=2, batch=2):
    """SGD through fd.wrap_ddp on this rank's padded shard (shuffled, seed 4); returns the
    trained weights. DDP averages the ranks' gradients, so this equals one process taking
    the ranks' batches together (see tests/test_distributed.py)."""
    data = ddp_data()
    model = fd.wrap_ddp(ddp_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = ResumableSampler(data, shuffle=True, seed=4, rank=fd.rank(), world=fd.world_size())
    sampler.set_epoch(1)
    loader = DataLoader(data, batch_size=batch, sampler=sampler)
    for _, (x, y) in zip(range(steps), loader):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    return fd.unwrap(model).state_dict()


def main(out_dir):
    info = fd.init_distributed()
    try:
        fc, local = collect()
        out = Path(out_dir)
        fc.save(out / f"rank{info.rank}.pt")
        (out / f"rank{info.rank}.json").write_text(json.dumps(
            {"rank": info.rank, "world": info.world_size, "backend": info.backend, "local_samples": local,
             "main": fd.is_main()}))
        torch.save(ddp_train(), out / f"ddp{info.rank}.pt")
        fd.barrier()
    finally:
        fd.cleanup()


if __name__ == "__main__":
    # A rank once aborted (SIGABRT, "terminate called without an active exception") after writing
    # every output, inside torch's teardown; this prints the Python stack of such an abort.
    faulthandler.enable()
    torch.set_num_threads(1)
    main(sys.argv[1])
