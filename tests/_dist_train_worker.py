"""Worker for tests/test_train_distributed.py.

    torchrun --nproc_per_node 2 tests/_dist_train_worker.py compare DATA OUT
        train_detr with DistributedDataParallel: batch BATCH per process on the padded
        shards of make_loader(shard=True); rank r saves OUT/compare_rank{r}.pt.
    python tests/_dist_train_worker.py compare DATA OUT
        (or reference() in-process) one process, batch 2 * BATCH, each step taking the two
        ranks' batches of the distributed run joined (InterleavedShards); OUT/compare_single.pt.
    torchrun --nproc_per_node 2 tests/_dist_train_worker.py cli OUT ARGS...
        ``fqdetr ARGS...`` with every file write of the training loop and the CLI recorded
        per rank in OUT/writes_rank{r}.txt (a rank that wrote nothing leaves no file).

The comparison is set up so that DDP's gradient equals the single-process one in exact
arithmetic (see tests/test_train_distributed.py): frozen BatchNorm, no dropout, every image
resized to one fixed size (no batch-dependent padding), eos_coef=1.
"""
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Sampler

from fqdetr.data import CocoDetection, builtin_paths
from fqdetr.data.transforms import Compose, Normalize, ToTensor
from fqdetr.engine import distributed as fd
from fqdetr.engine import ResumableSampler, TrainConfig, make_loader, train_detr
from fqdetr.models import build_criterion, build_detr

NUM_CLASSES = 16
ARCH = dict(norm="frozen", dropout=0.0, hidden_dim=32, nheads=2, dim_feedforward=64, enc_layers=1,
            dec_layers=2, num_queries=10)
BATCH, SIZE, SEED, STEPS, EPOCHS = 2, 48, 7, 4, 2  # 8 images: 2 steps per epoch and rank
TRAIN = TrainConfig(epochs=EPOCHS, lr=1e-4, lr_backbone=1e-4, lr_drop=10, clip_max_norm=0.1, max_steps=STEPS,
                    progress=False)


class FixedSize:
    """Every image resized to SIZE x SIZE (boxes in absolute xyxy scaled with it)."""

    def __call__(self, image, target=None):
        w, h = image.size
        image = image.resize((SIZE, SIZE), Image.BILINEAR)
        rw, rh = SIZE / w, SIZE / h
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([rw, rh, rw, rh])
        target["area"] = target["area"] * (rw * rh)
        target["size"] = torch.tensor([SIZE, SIZE], dtype=torch.int64)
        return image, target


def dataset(root):
    return CocoDetection(*builtin_paths(root, "train"), transforms=Compose([FixedSize(), ToTensor(), Normalize()]))


def model_and_criterion():
    torch.manual_seed(0)
    model = build_detr("tiny", num_classes=NUM_CLASSES, **ARCH)
    return model, build_criterion(NUM_CLASSES, dec_layers=ARCH["dec_layers"], eos_coef=1.0)


class InterleavedShards(Sampler):
    """One process reproducing a 2-rank run: step k is rank 0's k-th batch of ``batch``
    followed by rank 1's (the ResumableSampler shards of the same permutation)."""

    def __init__(self, data, batch, world=2, seed=SEED):
        self.data, self.batch, self.world, self.seed = data, batch, world, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def steps(self):
        """[(step, [indices of rank 0's batch], [rank 1's], ...)]."""
        shards = []
        for r in range(self.world):
            s = ResumableSampler(self.data, shuffle=True, seed=self.seed, rank=r, world=self.world)
            s.set_epoch(self.epoch)
            shards.append(list(s))
        n = len(shards[0]) // self.batch
        return [[sh[k * self.batch:(k + 1) * self.batch] for sh in shards] for k in range(n)]

    def __iter__(self):
        return iter([i for step in self.steps() for part in step for i in part][self.start:])

    def __len__(self):
        return len(self.steps()) * self.batch * self.world - self.start


def reference(root):
    """The single-process run: returns {"state": weights, "losses": per step}."""
    data = dataset(root)
    model, criterion = model_and_criterion()
    loader = make_loader(data, 2 * BATCH, SIZE, shuffle=True, seed=SEED)
    loader = torch.utils.data.DataLoader(data, batch_size=2 * BATCH, sampler=InterleavedShards(data, BATCH),
                                         collate_fn=loader.collate_fn, drop_last=True)
    out = train_detr(model, criterion, loader, config=TRAIN)
    return {"state": model.state_dict(), "losses": out["losses"]}


def compare(root, out_dir):
    if fd.world_size() == 1:
        torch.save(reference(root), Path(out_dir) / "compare_single.pt")
        return
    data = dataset(root)
    model, criterion = model_and_criterion()
    loader = make_loader(data, BATCH, SIZE, shuffle=True, seed=SEED, shard=True)
    out = train_detr(model, criterion, loader, config=TRAIN)
    torch.save({"state": model.state_dict(), "losses": out["losses"], "step": out["step"],
                "samples": [list(sampler_epoch(loader, e)) for e in range(EPOCHS)]},
               Path(out_dir) / f"compare_rank{fd.rank()}.pt")


def sampler_epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader.sampler)


def record_writes(out_dir):
    """Patch the writers the training run uses to note (rank, kind, path) first."""
    import fqdetr.engine.checkpoint as ckpt_mod
    import fqdetr.engine.train as train_mod
    import fqdetr.evaluation as evaluation

    def note(kind, path):
        with open(Path(out_dir) / f"writes_rank{fd.rank()}.txt", "a") as f:
            f.write(f"{kind} {Path(path).name}\n")

    def wrap(module, name, kind, path_of):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            note(kind, path_of(*args, **kwargs))
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    wrap(ckpt_mod, "atomic_torch_save", "save", lambda obj, path: path)
    wrap(train_mod, "save_detr_checkpoint", "save", lambda model, path, **kw: path)
    wrap(evaluation, "write_report", "report", lambda result, out, **kw: out)
    logger_call = train_mod._Logger.__call__

    def logged(self, record):
        if self.path:
            note("log", self.path)
        return logger_call(self, record)

    train_mod._Logger.__call__ = logged


def cli(out_dir, argv):
    from fqdetr.cli import main

    record_writes(out_dir)
    return main(argv)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = sys.argv[1]
    if mode == "compare":
        fd.init_distributed()
        try:
            compare(sys.argv[2], sys.argv[3])
        finally:
            fd.cleanup()
    elif mode == "cli":
        raise SystemExit(cli(sys.argv[2], sys.argv[3:]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
