"""The one way fqdetr batches a dataset: ``make_loader``. Its order depends only on
(seed, epoch), so training resumes mid-epoch, and every image is padded to the model's fixed
canvas, so detections do not depend on the batch (fqdetr.data.PadToCanvas)."""
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fqdetr.data import PadToCanvas
from fqdetr.engine import distributed as dist_utils


class ResumableSampler(Sampler):
    """Rank ``rank``'s share of the dataset's indices: a permutation seeded by ``seed + epoch``
    (in order when ``shuffle=False``), every ``world``-th element from ``rank`` on, starting
    at ``start``.

    ``set_epoch(epoch, start)`` is called by the training loop before each epoch; a resumed
    run passes the number of this rank's samples the interrupted epoch had already used, so
    no image is loaded just to be skipped. Every rank draws the same permutation from a
    private generator (the global RNG is untouched). ``pad``: see
    fqdetr.engine.distributed.shard_indices (equal counts for DDP, or a disjoint cover for
    sums such as the Fisher). With the defaults (rank 0 of 1) it is the whole dataset.
    """

    def __init__(self, data_source: Dataset, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world: int = 1, pad: bool = True):
        self.dataset_len = len(data_source)
        self.shuffle, self.seed, self.pad = shuffle, int(seed), pad
        self.rank, self.world = int(rank), int(world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank: expected 0 <= rank < world ({self.world}), got {self.rank}")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def _order(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.dataset_len, generator=g).tolist()
        return list(range(self.dataset_len))

    def __iter__(self) -> Iterator[int]:
        order = dist_utils.shard_indices(self._order(), self.rank, self.world, self.pad)
        return iter(order[self.start:])

    def __len__(self) -> int:
        n = self.dataset_len
        if self.pad:
            per_rank = -(-n // self.world) if n else 0
        else:
            per_rank = len(range(self.rank, n, self.world))
        return max(per_rank - self.start, 0)


def make_loader(dataset: Dataset, batch_size: int, canvas: int, shuffle: bool = True, seed: int = 0,
                num_workers: int = 0, drop_last: Optional[bool] = None, shard: bool = False,
                pad: bool = True) -> DataLoader:
    """DataLoader with a ResumableSampler, the PadToCanvas(``canvas``) collate and a private
    generator (so creating an iterator leaves the global torch RNG untouched).
    ``drop_last`` defaults to ``shuffle`` (full batches in training).

    shard=True, in a distributed run (world size > 1): this rank's share of the (seed, epoch)
    permutation; ``pad=True`` pads it so every rank takes the same number of steps (DDP),
    ``pad=False`` gives each image to exactly one rank (Fisher sums). ``batch_size`` is then per
    process, and the worker seeds differ by rank. In a single process shard changes nothing."""
    rank, world = (dist_utils.rank(), dist_utils.world_size()) if shard else (0, 1)
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, rank=rank, world=world, pad=pad)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=PadToCanvas(canvas),
                      num_workers=num_workers, drop_last=shuffle if drop_last is None else drop_last,
                      generator=torch.Generator().manual_seed(seed + 1000003 * rank),
                      persistent_workers=False)
