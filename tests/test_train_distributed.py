"""``train_detr`` / ``fqdetr train`` under torchrun: 2 gloo processes with DistributedDataParallel
against one process, rank-0-only files, and resume across launches.

The workers live in tests/_dist_train_worker.py. Every launch is ``python -m torch.distributed.run
--nproc_per_node 2`` on 127.0.0.1 with a free port and OMP_NUM_THREADS=1.
"""
import json
from pathlib import Path

import pytest
import torch

from _launch import load_worker, torchrun
from fqdetr.data import make_builtin_dataset

WORKER = Path(__file__).with_name("_dist_train_worker.py")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin")
    make_builtin_dataset(root, num_train=8, num_val=4, image_size=48, seed=3)
    return root


def test_two_processes_train_like_one_process_with_the_joined_batches(tiny_data, tmp_path):
    """2 ranks x batch 2 with DDP == 1 process x batch 4 (rank 0's batch + rank 1's), 4 AdamW steps.

    Why this is exact in arithmetic, so that only fp32 rounding separates the two runs: DDP
    applies the mean of the ranks' gradients. The L1/GIoU terms are sum_local / N_avg with
    N_avg the all-reduced mean box count (SetCriterion.batch_num_boxes), so the mean over ranks
    is sum_all / N_all, the full-batch term, whatever the ranks' box counts (they differ here:
    checked below, so a criterion normalising by the local count would fail). The class term is
    a weighted mean over the local batch, sum w*nll / sum w, which averages to the full-batch
    value only when every rank's weight sum is equal: eos_coef=1 makes all weights 1 and the
    ranks' query counts are equal. Batch statistics (BatchNorm in training mode), dropout masks
    and batch-dependent padding would also differ between a half and a full batch, so the worker
    uses frozen BatchNorm, dropout 0 and one fixed image size.
    """
    w = load_worker(WORKER)
    torchrun(WORKER, "compare", tiny_data, tmp_path)
    ranks = [torch.load(tmp_path / f"compare_rank{r}.pt", weights_only=True) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (and much faster than 2 threads on a busy machine)
    try:
        single = w.reference(tiny_data)  # this process (world size 1), InterleavedShards sampler
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in ranks] == [w.STEPS] * 2

    # The data: each rank a padded shard of the same permutation, disjoint here (8 images);
    # at least one step gives the two ranks different box counts.
    boxes = _box_counts(tiny_data)
    for epoch in range(w.EPOCHS):
        a, b = ranks[0]["samples"][epoch], ranks[1]["samples"][epoch]
        assert sorted(a + b) == list(range(8))
    steps = [(ranks[0]["samples"][e][k:k + 2], ranks[1]["samples"][e][k:k + 2])
             for e in range(w.EPOCHS) for k in (0, 2)]
    assert any(sum(boxes[i] for i in p) != sum(boxes[i] for i in q) for p, q in steps)

    # Logged losses: DDP's are means over the ranks, i.e. the global batch's loss.
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    init = w.model_and_criterion()[0].state_dict()
    moved = 0.0
    for name, want in single["state"].items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name  # identical replicas
        # The same gradient summed in another grouping (two 2-image GEMMs + all-reduce vs one
        # 4-image batch) differs by a few ulps; AdamW maps it to a weight change of at most lr
        # per step (1e-4), with a relative error of the gradient's. Observed max |diff|: 4e-8.
        # 2e-6 is 2% of one step; normalising the box terms by each rank's own box count gives
        # 5e-4 instead.
        torch.testing.assert_close(ranks[0]["state"][name], want, rtol=0, atol=2e-6)
        if want.is_floating_point():
            moved = max(moved, (want - init[name]).abs().max().item())
    assert moved > 1e-4  # the weights did move (4 steps of about lr each)


def _box_counts(root):
    ann = json.loads((Path(root) / "annotations" / "instances_train.json").read_text())
    ids = [img["id"] for img in ann["images"]]  # dataset index -> image id
    return [sum(a["image_id"] == i for a in ann["annotations"]) for i in ids]


CLI = ["train", "--hidden-dim", "32", "--nheads", "2", "--dim-feedforward", "64", "--enc-layers", "1",
       "--dec-layers", "2", "--num-queries", "10", "--norm", "batch", "--batch-size", "2", "--image-size", "48",
       "--epochs", "3", "--eval-every", "1", "--no-progress"]  # dropout 0.1 and augmentation on


def _writes(rec, rank):
    path = rec / f"writes_rank{rank}.txt"
    return path.read_text().split("\n")[:-1] if path.exists() else []


def test_cli_under_torchrun_rank0_writes_and_resume_continues(tiny_data, tmp_path):
    """fqdetr train on 2 ranks (8 images, 2 per rank per step: 2 steps per epoch). A stops at
    step 3 (mid-epoch 1); B resumes from A's checkpoint to step 5; C runs 0 -> 5 uninterrupted."""
    runs = {name: (tmp_path / name, tmp_path / f"rec{name}") for name in "ABC"}
    for out, rec in runs.values():
        rec.mkdir()
    data = ["--data", str(tiny_data)]
    (a, rec_a), (b, rec_b), (c, rec_c) = runs.values()
    torchrun(WORKER, "cli", rec_a, *CLI, *data, "--max-steps", "3", "--out", a)
    torchrun(WORKER, "cli", rec_b, *CLI, *data, "--max-steps", "5", "--out", b, "--resume", a / "checkpoint.pth")
    torchrun(WORKER, "cli", rec_c, *CLI, *data, "--max-steps", "5", "--out", c)

    # Rank 0 alone wrote: checkpoints, best.pth after epoch 0's evaluation, the log, the report.
    for rec in (rec_a, rec_b, rec_c):
        assert _writes(rec, 1) == []
    assert sorted(set(_writes(rec_a, 0))) == ["log log.jsonl", "report eval", "save best.pth", "save checkpoint.pth"]
    assert _writes(rec_a, 0).count("save checkpoint.pth") == 2  # end of epoch 0, then at max_steps
    log_a = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    assert [(r["type"], r["epoch"], r["step"]) for r in log_a] == [("epoch", 0, 2)]  # one line, not one per rank
    assert "val_AP" in log_a[0] and (a / "eval" / "report.json").is_file()
    assert json.loads((a / "config.json").read_text())["world_size"] == 2

    ckpt_a = torch.load(a / "checkpoint.pth", weights_only=True)
    assert (ckpt_a["epoch"], ckpt_a["step"], ckpt_a["epoch_step"], ckpt_a["world_size"]) == (1, 3, 1, 2)
    assert not any(k.startswith("module.") for k in ckpt_a["model"])  # the unwrapped model
    assert len(ckpt_a["rng_ranks"]) == 2
    assert not torch.equal(ckpt_a["rng_ranks"][0]["torch"], ckpt_a["rng_ranks"][1]["torch"])

    # B continued from step 3 (the rest of epoch 1: one step, then step 5 in epoch 2)...
    ckpt_b, ckpt_c = (torch.load(p / "checkpoint.pth", weights_only=True) for p in (b, c))
    assert (ckpt_b["epoch"], ckpt_b["step"], ckpt_b["epoch_step"]) == (2, 5, 1)
    log_b = [json.loads(line) for line in (b / "log.jsonl").read_text().splitlines()]
    assert [(r["type"], r["epoch"], r["step"]) for r in log_b] == [("epoch", 1, 4)]
    # ...exactly where the uninterrupted run is: same images, each rank's own RNG stream
    # (dropout, flips, scales) restored, same optimizer and scheduler state.
    for name, want in ckpt_c["model"].items():
        assert torch.equal(ckpt_b["model"][name], want), name
    for rb, rc in zip(ckpt_b["rng_ranks"], ckpt_c["rng_ranks"]):
        assert torch.equal(rb["torch"], rc["torch"])


def test_single_process_resume_of_a_two_rank_checkpoint_warns(tiny_data, tmp_path):
    """A checkpoint from 2 ranks resumed by 1 process mid-epoch: allowed, with a warning that
    the rest of the epoch is resharded. (Checkpoint built by hand: no launch needed.)"""
    from fqdetr.cli import main
    from fqdetr.engine import save_training_checkpoint
    from fqdetr.engine.checkpoint import capture_rng_state
    from fqdetr.models import build_detr

    model = build_detr("tiny", num_classes=16, hidden_dim=32, nheads=2, dim_feedforward=64, enc_layers=1,
                       dec_layers=2, num_queries=10, norm="batch")
    ckpt = tmp_path / "two_ranks.pth"
    save_training_checkpoint(ckpt, model, epoch=0, step=1, epoch_step=1,
                             extra={"world_size": 2, "rng_ranks": [capture_rng_state()] * 2, "canvas": 72})
    with pytest.warns(UserWarning, match="written by 2 process.*resharded"):
        rc = main([*CLI, "--data", str(tiny_data), "--max-steps", "2", "--out", str(tmp_path / "out"),
                   "--resume", str(ckpt), "--eval-every", "5"])
    assert rc == 0
    saved = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert saved["step"] == 2 and "world_size" not in saved
    assert saved["canvas"] == 72  # the resumed model's canvas, not the default 4/3 * 48 = 64


def test_shard_is_a_no_op_in_one_process(tiny_data):
    from fqdetr.engine import ResumableSampler, make_loader

    data = list(range(10))
    plain, sharded = make_loader(data, 2, 1, seed=3), make_loader(data, 2, 1, seed=3, shard=True)
    assert type(sharded.sampler) is ResumableSampler
    assert list(sharded.sampler) == list(plain.sampler)
    assert sharded.generator.initial_seed() == plain.generator.initial_seed()
