"""The main job end to end on the shipped tiny DETR and a few generated images."""
import json

import numpy as np
import torch
from PIL import Image

from fqdetr.cli.demo import DEFAULT_MODEL
from fqdetr.data import make_builtin_dataset
from fqdetr.experiments.demo import run_demo
from fqdetr.engine.quantize import quantize_detr
from fqdetr.models import load_detr_checkpoint
from fqdetr.visualize import CRITICAL_COLOUR, OTHER_COLOUR

METHODS = ["float", "ptq uniform w4a8", "ptq fisher-overall", "ptq fisher-critical", "qat",
           "qat + fisher-trace reg", "qat + critical up-weighted"]


def test_demo_pipeline_on_tiny_data(tmp_path):
    torch.set_num_threads(2)
    out = tmp_path / "demo"
    make_builtin_dataset(tmp_path / "data", num_train=32, num_val=16, seed=0)
    results = run_demo(out, DEFAULT_MODEL, tmp_path / "data", critical="person", qat_steps=2, fisher_images=8,
                       eval_images=16, batch_size=4)
    assert (out / "report.md").exists() and (out / "layers.png").stat().st_size > 0
    assert (out / "groups.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == METHODS
    for name, r in saved["methods"].items():
        for split in ("val", "train"):
            values = [r[split]["mAP"], *r[split]["critical"].values()]
            assert all(v is None or 0.0 <= v <= 1.0 for v in values), (name, split)
    assert set(saved["allocations"]["fisher-critical"]) == set(saved["sizes"])
    avg = sum(saved["sizes"][n] * b for n, b in saved["allocations"]["fisher-critical"].items()) / \
        sum(saved["sizes"].values())
    assert avg <= saved["budget_avg_bits_all_layers"] + 1e-9
    for name in ("overall", "critical"):
        assert all(t >= 0 for t in saved["traces"][name].values()) and sum(saved["traces"][name].values()) > 0
    report = (out / "report.md").read_text()
    assert all(f"| {m} |" in report for m in METHODS)
    # the detections picture: 4 val images, a row each of float / uniform / Fisher-critical, linked
    assert "![detections](detections.png)" in report
    assert saved["detections_picture"]["images"] == 4 and len(saved["detections_picture"]["methods"]) == 3
    with Image.open(out / "detections.png") as picture:
        assert picture.width > 3 * 100 and picture.height > 4 * 100  # images of shorter side >= 100 px
        pixels = np.asarray(picture.convert("RGB")).reshape(-1, 3)
    drawn = sum(int((pixels == colour).all(1).sum()) for colour in (CRITICAL_COLOUR, OTHER_COLOUR))
    assert drawn > 50  # the shipped DETR finds objects with scores >= 0.5 on these images
    # every arm timed, in the order run
    arms = list(saved["timings"])
    assert arms.index("float: eval") < arms.index("fisher traces critical") < arms.index("qat: 2 steps")
    assert all(t["wall"] >= 0 and t["cpu"] >= 0 for t in saved["timings"].values())
    # The float model must beat 2-bit uniform PTQ on the same images.
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.setup import checkpoint_geometry, evaluate_splits, load_datasets

    image_size, canvas = checkpoint_geometry(DEFAULT_MODEL)
    data = load_datasets(tmp_path / "data", image_size, 400, 16)
    loaders = {"val": make_loader(data["val"], 4, canvas, shuffle=False)}
    model = load_detr_checkpoint(DEFAULT_MODEL).eval()
    two_bit = quantize_detr(model, w_bits=2, a_bits=2, calib_loader=loaders["val"], calib_batches=2)
    float_map = results["methods"]["float"]["val"]["mAP"]
    assert float_map > evaluate_splits(two_bit, loaders, {"person": "person"})["val"]["mAP"]


def test_demo_sizes_follow_the_detector_and_the_options(tmp_path):
    import argparse

    from fqdetr.cli import demo as demo_cli
    from fqdetr.experiments.demo import DEMO_SIZES, demo_sizes
    from fqdetr.models import build_deformable_detr, save_detr_checkpoint

    deformable = tmp_path / "deformable.pth"
    save_detr_checkpoint(build_deformable_detr("deformable_tiny", num_classes=3, hidden_dim=32, nheads=2,
                                               enc_layers=1, dec_layers=1, num_queries=5), deformable)
    assert demo_sizes(DEFAULT_MODEL) == DEMO_SIZES["detr"]
    assert demo_sizes(deformable) == DEMO_SIZES["deformable_detr"] != DEMO_SIZES["detr"]
    assert demo_sizes(deformable, qat_steps=3, eval_images=None) == dict(DEMO_SIZES["deformable_detr"], qat_steps=3)
    # the command's help states the same defaults
    parser = argparse.ArgumentParser()
    demo_cli.add_parser(parser.add_subparsers())
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["demo"]._actions}
    for key, value in DEMO_SIZES["detr"].items():
        expected = f"{value} for DETR, {DEMO_SIZES['deformable_detr'][key]} for Deformable DETR"
        assert expected in helps[key], key
