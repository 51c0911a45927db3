"""torch.distributed helpers, and Fisher estimation over 2 gloo processes == one process."""
import json
from pathlib import Path

import pytest
import torch

from _launch import load_worker, torchrun
from fqdetr.engine import distributed as fd
from fqdetr.engine.loader import ResumableSampler
from fqdetr.fisher import FisherCollector

WORKER = Path(__file__).with_name("_dist_fisher_worker.py")


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = fd.init_distributed()
    assert not info.distributed and info.world_size == 1 and info.rank == 0 and info.is_main
    assert fd.world_size() == 1 and fd.rank() == 0 and fd.is_main()
    fd.barrier()
    fd.cleanup()
    t = torch.ones(3)
    assert fd.all_reduce_sum(t) is t and t.tolist() == [1, 1, 1]
    assert fd.broadcast_object({"a": 1}) == {"a": 1}
    model = torch.nn.Linear(2, 2)
    assert fd.wrap_ddp(model) is model and fd.unwrap(model) is model
    # WORLD_SIZE=1 under torchrun: still a single process, no group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not fd.init_distributed().distributed
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        fd.init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK"):
        fd.init_distributed()


@pytest.mark.parametrize("n", [0, 1, 7, 8])
def test_shards_cover_the_dataset(n):
    data = list(range(n))
    for world in (1, 2, 3):
        disjoint = [ResumableSampler(data, shuffle=True, seed=5, rank=r, world=world, pad=False)
                    for r in range(world)]
        got = [list(s) for s in disjoint]
        assert sorted(sum(got, [])) == data  # every sample exactly once over the ranks
        assert [len(s) for s in disjoint] == [len(g) for g in got]
        padded = [list(ResumableSampler(data, shuffle=True, seed=5, rank=r, world=world))
                  for r in range(world)]
        assert len({len(p) for p in padded}) == 1  # equal step counts for DDP
        assert set(sum(padded, [])) == set(data)
    # same permutation on every rank, depending only on (seed, epoch); resumable mid-epoch
    s = ResumableSampler(list(range(10)), seed=1, rank=1, world=2)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=2)
    assert list(s) == full[2:] and len(s) == len(full) - 2
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(data, rank=2, world=2)


def test_two_gloo_processes_give_the_single_process_fisher_and_ddp_steps(tmp_path):
    """torchrun --nproc_per_node 2 (gloo) on disjoint halves of 7 samples, all-reduced, against
    one process over all 7, through the same worker code (tests/_dist_fisher_worker.py); and
    DDP SGD steps through fd.wrap_ddp against single-process steps on the joined batches."""
    single, _ = load_worker(WORKER).collect()  # world size 1 here: every sample in this process
    torchrun(WORKER, tmp_path, timeout=90)
    meta = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [m["backend"] for m in meta] == ["gloo", "gloo"] and [m["world"] for m in meta] == [2, 2]
    assert [m["main"] for m in meta] == [True, False]
    assert sorted(m["local_samples"] for m in meta) == [3, 4]  # unpadded shards of 7
    ranks = [FisherCollector.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert set(ranks[0].sums) == set(single.sums) == {"embed", "attn", "attn.out_proj", "ffn.0", "ffn.2", "head"}
    for name, want in single.sums.items():
        # After the all-reduce both ranks hold the very same tensor.
        assert torch.equal(ranks[0].sums[name], ranks[1].sums[name]), name
        assert ranks[0].counts[name] == ranks[1].counts[name] == single.counts[name] == 7
        # Each element is a sum over 7 images of squared fp32 per-image gradients. Two processes
        # add the same terms grouped differently ((a+b+c+d) + (e+f+g) vs batches in another
        # order) and may run their GEMMs on differently shaped batches; a sum of n non-negative
        # fp32 terms is exact to (n - 1) * eps = 7e-7 relative, and cancellation inside a
        # per-image gradient can make a small element's relative error larger, so the bound is
        # 1e-5 relative plus 1e-6 of the layer's largest element (observed: ~1 ulp of the max).
        torch.testing.assert_close(ranks[0].sums[name], want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    want_tr, got_tr = single.traces(), ranks[0].traces()
    assert got_tr == pytest.approx(want_tr, rel=1e-5)

    # DDP: two SGD steps on padded shards of 8 samples, 2 per rank per step, against one
    # process taking both ranks' batches (4 samples) per step with the same mean loss.
    worker = load_worker(WORKER)
    data, model = worker.ddp_data(), worker.ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shards = []
    for r in range(2):
        sampler = ResumableSampler(data, shuffle=True, seed=4, rank=r, world=2)
        sampler.set_epoch(1)
        shards.append(list(sampler))
    for step in range(2):
        idx = shards[0][2 * step:2 * step + 2] + shards[1][2 * step:2 * step + 2]
        x, y = data[idx]
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    trained = [torch.load(tmp_path / f"ddp{r}.pt", weights_only=True) for r in range(2)]
    for name, want in model.state_dict().items():
        assert torch.equal(trained[0][name], trained[1][name]), name  # replicas stay identical
        # The all-reduced mean of two 2-sample gradient means vs one 4-sample mean: the same
        # terms rounded in another grouping, a few ulps after two steps.
        torch.testing.assert_close(trained[0][name], want, rtol=1e-5, atol=1e-6)


def _fqdetr_import_graph():
    """{fqdetr module: fqdetr modules it imports anywhere in its file (lazy imports too)}."""
    import ast

    import fqdetr

    root = Path(fqdetr.__file__).parent
    names = {".".join(("fqdetr", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}

    def module_of(name):  # "fqdetr.engine.loader.make_loader" -> "fqdetr.engine.loader"
        while name not in names:
            name = name.rpartition(".")[0]
        return name

    def absolute(node, name, path):  # the module "from <node.module> import" names, relative ones resolved
        if not node.level:
            return node.module or ""
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        package = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
        return f"{package}.{node.module}" if node.module else package

    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {module_of(a.name) for a in node.names if a.name.startswith("fqdetr")}
            elif isinstance(node, ast.ImportFrom) and absolute(node, name, path).startswith("fqdetr"):
                deps |= {module_of(f"{absolute(node, name, path)}.{a.name}") for a in node.names}
        graph[name] = deps - {name}
    return graph


def test_distributed_helpers_are_a_leaf_and_fqdetr_has_no_import_cycle():
    import graphlib

    graph = _fqdetr_import_graph()
    assert {"fqdetr.engine.loader", "fqdetr.engine.train", "fqdetr.experiments.demo"} <= graph.keys()
    assert graph["fqdetr.engine.distributed"] == set()
    assert "fqdetr.engine.distributed" in graph["fqdetr.engine.loader"]
    assert "fqdetr.models.matcher" in graph["fqdetr.models.deformable.criterion"]  # "from ..matcher import"
    list(graphlib.TopologicalSorter(graph).static_order())  # raises graphlib.CycleError on a cycle
