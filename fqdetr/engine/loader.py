"""Data loaders whose order depends only on (seed, epoch), so training can resume mid-epoch."""
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fqdetr.data import collate_fn


class ResumableSampler(Sampler):
    """Indices of a dataset: a permutation seeded by ``seed + epoch`` (or in order when
    ``shuffle=False``), starting at ``start``.

    ``set_epoch(epoch, start)`` is called by the training loop before each epoch; a
    resumed run passes the number of samples the interrupted epoch had already used,
    so no image is loaded just to be skipped. Draws nothing from the global RNG.
    """

    def __init__(self, data_source: Dataset, shuffle: bool = True, seed: int = 0):
        self.num_samples = len(data_source)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        return iter(order[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                num_workers: int = 0, drop_last: Optional[bool] = None, shard: bool = False) -> DataLoader:
    """DataLoader with a ResumableSampler, DETR's padding collate_fn and a private
    generator (so creating an iterator leaves the global torch RNG untouched).
    ``drop_last`` defaults to ``shuffle`` (full batches in training).

    shard=True, in a distributed run (world size > 1): this rank's share of the (seed,
    epoch) permutation, padded so every rank takes the same number of steps
    (fqdetr.engine.distributed.DistributedResumableSampler); ``batch_size`` is then per
    process, and the worker seeds differ by rank. In a single process shard changes nothing."""
    from fqdetr.engine import distributed as dist_utils

    rank = dist_utils.rank()
    if shard and dist_utils.world_size() > 1:
        sampler = dist_utils.DistributedResumableSampler(dataset, shuffle=shuffle, seed=seed, pad=True)
    else:
        sampler, rank = ResumableSampler(dataset, shuffle=shuffle, seed=seed), 0
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, drop_last=shuffle if drop_last is None else drop_last,
                      generator=torch.Generator().manual_seed(seed + 1000003 * rank),
                      persistent_workers=False)
