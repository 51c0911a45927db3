"""The method's sub-commands chained on a tiny (untrained) DETR and a few generated images."""
import json

import pytest
import torch

from fqdetr.cli import main
from fqdetr.data import make_builtin_dataset
from fqdetr.models import build_detr, save_detr_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)  # a module fixture runs before the autouse per-test seed
    save_detr_checkpoint(build_detr("tiny", num_classes=16), root / "model.pth")
    make_builtin_dataset(root / "data", num_train=24, num_val=8, seed=0)
    return root


def _common(root):
    return ["--model", str(root / "model.pth"), "--data", str(root / "data"), "--batch-size", "4",
            "--eval-images", "8"]


def test_fisher_allocate_ptq_qat_chain(run_dir, capsys):
    common = _common(run_dir)
    assert main(["fisher", *common, "--out", str(run_dir / "f"), "--images", "8"]) == 0
    traces = json.loads((run_dir / "f" / "fisher.json").read_text())
    assert set(traces) == {"overall", "critical", "_meta"} and all(v >= 0 for v in traces["critical"].values())
    assert sum(traces["critical"].values()) > 0  # squared gradients: all zero would mean none reached a layer
    assert main(["allocate", "--model", str(run_dir / "model.pth"), "--fisher", str(run_dir / "f/fisher.json"),
                 "--out", str(run_dir / "a"), "--budget", "4"]) == 0
    alloc = json.loads((run_dir / "a" / "allocation.json").read_text())
    assert alloc["class_embed"]["w_bits"] == 8 and set(alloc) == set(traces["critical"])
    assert main(["ptq", *common, "--out", str(run_dir / "p"), "--allocation", str(run_dir / "a/allocation.json"),
                 "--calib-batches", "1"]) == 0
    ptq = json.loads((run_dir / "p" / "ptq.json").read_text())
    assert 0.0 <= ptq["eval"]["val"]["mAP"] <= 1.0 and (run_dir / "p" / "quantized_codes.pt").exists()
    config = run_dir / "qat.yaml"
    config.write_text("steps: 2\nreg_lambda: 0.05\n")
    assert main(["qat", *common, "--out", str(run_dir / "q"), "--config", str(config)]) == 0
    qat = json.loads((run_dir / "q" / "qat.json").read_text())
    assert len(qat["history"]) == 2 and "R" in qat["history"][0] and qat["args"]["reg_lambda"] == 0.05


def test_cli_errors_are_clear(run_dir, tmp_path, capsys):
    """Bad input: exit code 2 and one line naming the option, no traceback."""
    def error_of(argv):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "smallest feasible" in error_of(["allocate", "--model", str(run_dir / "model.pth"), "--strategy",
                                            "random", "--out", str(tmp_path), "--budget", "1"])
    assert "--fisher" in error_of(["allocate", "--model", str(run_dir / "model.pth"), "--out", str(tmp_path)])
    bad = tmp_path / "bad.json"
    bad.write_text('{"stepz": 3}')
    assert "unknown options ['stepz']" in error_of(["qat", *_common(run_dir), "--out", str(tmp_path),
                                                    "--config", str(bad)])
    assert "does not exist" in error_of(["ptq", "--model", str(tmp_path / "nope.pth"), "--out", str(tmp_path)])
    assert "results" in error_of(["report", str(bad)])


def test_fisher_under_torchrun_equals_one_process(run_dir, tmp_path):
    """2 gloo processes, each on half the images, all-reduced: the single-process traces.
    Both sides take one thread per process and batches of one image: a 1-ulp change in a
    convolution's output (which other thread counts or batch shapes give) moves a 4-bit
    model's traces by percents (docs/METHOD.md section 7)."""
    from _launch import torchrun

    common = [*_common(run_dir), "--images", "6", "--threads", "1"]
    common[common.index("--batch-size") + 1] = "1"
    threads = torch.get_num_threads()
    try:
        assert main(["fisher", *common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun("-m", "fqdetr", "fisher", *common, "--out", tmp_path / "two", timeout=300)
    one = json.loads((tmp_path / "one" / "fisher.json").read_text())
    two = json.loads((tmp_path / "two" / "fisher.json").read_text())
    assert (one["_meta"]["processes"], two["_meta"]["processes"]) == (1, 2)
    assert one["_meta"]["threads"] == two["_meta"]["threads"] == 1
    for objective in ("overall", "critical"):
        floor = 1e-9 * max(one[objective].values())
        for layer, trace in one[objective].items():
            # Same per-image fp32 sums, added in another order across processes: ~1e-7 relative.
            # The floor covers decoder layer 0's self-attention, whose trace is rounding noise
            # (its gradient is 0 in exact arithmetic, docs/METHOD.md section 2.3).
            assert abs(two[objective][layer] - trace) <= 1e-5 * abs(trace) + floor, (objective, layer)
