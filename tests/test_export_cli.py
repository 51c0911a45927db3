"""fqdetr ptq --packed, fqdetr export, fqdetr eval of every model kind, on a tiny (untrained)
DETR and a few generated images; their bad input."""
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from fqdetr.cli import main
from fqdetr.data import make_builtin_dataset
from fqdetr.engine.quantize import quantize_detr
from fqdetr.export import OnnxDetector, load_artifact, load_packed, model_kind
from fqdetr.models import build_detr, save_detr_checkpoint

IMAGE_SIZE, CANVAS = 64, 96  # recorded in the checkpoint: every artifact must carry them


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_cli")
    torch.manual_seed(0)  # a module fixture runs before the autouse per-test seed
    make_builtin_dataset(root / "data", num_train=8, num_val=8, image_size=80, seed=0)
    categories = json.loads((root / "data/annotations/instances_val.json").read_text())["categories"]
    save_detr_checkpoint(build_detr("tiny", num_classes=16), root / "model.pth",
                         extra={"image_size": IMAGE_SIZE, "canvas": CANVAS, "categories": categories,
                                "label_to_cat_id": [c["id"] for c in categories], "num_classes": 16})
    return root


def _data(root):
    return ["--data", str(root / "data"), "--batch-size", "4"]


def error_of(capsys, argv):
    """The one-line error of a command that must fail with exit code 2 (after any progress bar)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def artifacts(root):
    """ptq (quantized checkpoint and packed file), then export of the quantized checkpoint."""
    assert main(["ptq", "--model", str(root / "model.pth"), *_data(root), "--eval-images", "8", "--calib-batches",
                 "1", "--out", str(root / "p"), "--packed", str(root / "p/model.fqp")]) == 0
    assert main(["export", "--model", str(root / "model.pth"), "--quantized", str(root / "p/quantized_state.pt"),
                 "--out", str(root / "model.onnx")]) == 0
    return {"float": root / "model.pth", "quantized": root / "p/quantized_state.pt", "packed": root / "p/model.fqp",
            "onnx": root / "model.onnx"}


def test_every_artifact_is_recognised_and_carries_the_canvas(artifacts):
    for kind, path in artifacts.items():
        assert model_kind(path) == kind
        metadata = load_artifact(path).metadata
        assert (metadata["image_size"], metadata["canvas"], metadata["num_classes"]) == (IMAGE_SIZE, CANVAS, 16), kind
    assert OnnxDetector(artifacts["onnx"]).family_name == "detr"


def test_packed_file_is_the_quantized_checkpoint_bit_exact(artifacts):
    quantized, packed = load_artifact(artifacts["quantized"]).model, load_packed(artifacts["packed"])
    images, mask = torch.rand(2, 3, CANVAS, CANVAS), torch.zeros(2, CANVAS, CANVAS, dtype=torch.bool)
    with torch.no_grad():
        a, b = quantized((images, mask)), packed((images, mask))
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    assert os.path.getsize(artifacts["packed"]) < os.path.getsize(artifacts["float"]) / 4


def test_a_bare_quantized_state_dict_needs_its_float_model(root, artifacts, tmp_path, capsys):
    """fqdetr qat's qat_state.pt: a state dict without config, whose keys do not fix the
    architecture (the tiny preset's 4 heads leave no trace): export takes it with --model."""
    quantized = load_artifact(artifacts["quantized"]).model
    torch.save(quantized.state_dict(), tmp_path / "qat_state.pt")
    assert model_kind(tmp_path / "qat_state.pt") == "quantized"
    err = error_of(capsys, ["eval", "--model", str(tmp_path / "qat_state.pt"), *_data(root)])
    assert "qat_state.pt: a quantized state dict without its model config" in err
    assert main(["export", "--model", str(root / "model.pth"), "--quantized", str(tmp_path / "qat_state.pt"),
                 "--out", str(tmp_path / "bare.onnx")]) == 0
    # the same state on the same model as ptq's quantized checkpoint: the same graph and codes
    assert onnx.load(tmp_path / "bare.onnx") == onnx.load(artifacts["onnx"])


def _scores(root, name, model):
    out = root / f"eval_{name}"
    assert main(["eval", "--model", str(model), *_data(root), "--out", str(out), "--no-plots"]) == 0
    report = json.loads((out / "report.json").read_text())
    detections = json.loads((out / "detections.json").read_text())
    return report, np.array([d["score"] for d in detections])


def test_eval_runs_every_kind_with_the_same_protocol(root, artifacts):
    reports, scores = {}, {}
    for kind, path in artifacts.items():
        reports[kind], scores[kind] = _scores(root, kind, path)
        assert reports[kind]["overall"]["AP"] >= 0 and len(scores[kind]) == 8 * 20, kind  # 20 queries an image
    assert np.array_equal(scores["packed"], scores["quantized"])
    # the same images, padded to the same canvas: onnxruntime agrees with the fake-quant model
    assert np.median(np.abs(scores["onnx"] - scores["quantized"])) < 1e-4
    assert np.abs(scores["onnx"] - scores["quantized"]).max() < 0.05
    assert not np.array_equal(scores["float"], scores["quantized"])  # 4-bit weights do change the model


def test_export_quantizes_an_allocation_at_its_bit_widths(root, tmp_path):
    allocation = tmp_path / "allocation.json"
    allocation.write_text(json.dumps({"transformer.encoder.layers.0.linear1": 3}))
    out = tmp_path / "alloc.onnx"
    assert main(["export", "--model", str(root / "model.pth"), *_data(root), "--allocation", str(allocation),
                 "--calib-images", "4", "--out", str(out)]) == 0
    inits = {i.name: i for i in onnx.load(out).graph.initializer}
    codes = [i for n, i in inits.items() if n.startswith("transformer.encoder.layers.0.linear1.") and
             n.endswith(".codes")]
    assert len(codes) == 1 and codes[0].data_type == TensorProto.INT4
    assert numpy_helper.to_array(codes[0]).astype(int).max() == 3  # the 3-bit range, in int4
    assert OnnxDetector(out).metadata["canvas"] == CANVAS


def test_export_errors_leave_nothing(root, tmp_path, capsys):
    model, out = str(root / "model.pth"), tmp_path / "m.onnx"
    err = error_of(capsys, ["export", "--model", model, *_data(root), "--calib-images", "4", "--opset", "20",
                            "--out", str(out)])
    assert "4-bit weights are stored as int4, which needs opset 21 or later (got opset 20)" in err
    uncalibrated = tmp_path / "uncalibrated.pt"
    torch.save(quantize_detr(build_detr("tiny", num_classes=16)).state_dict(), uncalibrated)
    err = error_of(capsys, ["export", "--model", model, "--quantized", str(uncalibrated), "--out", str(out)])
    assert "quantizer not calibrated" in err
    assert "--out: expected a file name ending in .onnx" in error_of(
        capsys, ["export", "--model", model, "--quantized", str(uncalibrated), "--out", str(tmp_path / "m.pth")])
    other = build_detr("tiny", num_classes=5)
    torch.save(quantize_detr(other).state_dict(), tmp_path / "other.pt")
    err = error_of(capsys, ["export", "--model", model, "--quantized", str(tmp_path / "other.pt"), "--out", str(out)])
    assert "other.pt: the quantized state does not fit the model" in err
    assert sorted(os.listdir(tmp_path)) == ["other.pt", "uncalibrated.pt"]


def test_eval_of_a_file_of_no_known_kind_or_a_corrupt_one(root, artifacts, tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("not a model")
    err = error_of(capsys, ["eval", "--model", str(text), *_data(root)])
    assert "notes.pth: not a model file fqdetr knows; expected a float or quantized" in err
    corrupt = tmp_path / "model.fqp"
    corrupt.write_bytes(artifacts["packed"].read_bytes()[:5000])
    err = error_of(capsys, ["eval", "--model", str(corrupt), *_data(root)])
    assert "model.fqp: not a model file fqdetr knows" in err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(artifacts["onnx"].read_bytes()[:5000])
    assert "broken.onnx: onnxruntime cannot load it" in error_of(capsys, ["eval", "--model", str(broken), *_data(root)])
    assert "--packed: expected a file name ending in .fqp" in error_of(
        capsys, ["ptq", "--model", str(root / "model.pth"), *_data(root), "--out", str(tmp_path / "p"),
                 "--packed", str(tmp_path / "p.pth")])


def test_detect_draws_and_writes_coco_results(root, artifacts, tmp_path):
    from PIL import Image

    from fqdetr.visualize import CRITICAL_COLOUR, OTHER_COLOUR

    images = sorted((root / "data/val").iterdir())[:3]
    out = tmp_path / "det"
    assert main(["detect", "--model", str(artifacts["onnx"]), *map(str, images), "--out", str(out),
                 "--score-threshold", "0", "--critical", "person+dog"]) == 0
    detections = json.loads((out / "detections.json").read_text())
    assert sorted({d["image_id"] for d in detections}) == [int(p.stem) for p in images]  # numeric stems
    assert len(detections) == 3 * 20  # threshold 0: every query of every image
    categories = json.loads((root / "data/annotations/instances_val.json").read_text())["categories"]
    critical = {c["id"] for c in categories if c["supercategory"] == "person" or c["name"] == "dog"}
    for path in images:
        picture, original = Image.open(out / f"{path.stem}.png"), Image.open(path)
        assert picture.size == original.size
        colours = {c for _, c in picture.getcolors(1 << 20)}
        # the most confident detection is drawn last, on top: its class kind's colour shows
        top = max((d for d in detections if d["image_id"] == int(path.stem)), key=lambda d: d["score"])
        assert (CRITICAL_COLOUR if top["category_id"] in critical else OTHER_COLOUR) in colours
    # names without numbers: positions on the command line, from 1, listed in images.json
    named = [tmp_path / "first.jpg", tmp_path / "second.png"]
    for path, source in zip(named, images):
        Image.open(source).save(path)
    assert main(["detect", "--model", str(artifacts["packed"]), *map(str, named), "--out", str(tmp_path / "n"),
                 "--score-threshold", "0.99"]) == 0
    assert json.loads((tmp_path / "n/images.json").read_text()) == {"1": str(named[0]), "2": str(named[1])}
    assert all(d["score"] >= 0.99 for d in json.loads((tmp_path / "n/detections.json").read_text()))


def test_detect_names_a_bad_image_and_writes_nothing(root, artifacts, tmp_path, capsys):
    good = sorted((root / "data/val").iterdir())[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "det"
    err = error_of(capsys, ["detect", "--model", str(artifacts["onnx"]), str(good), str(bad), "--out", str(out)])
    assert f"cannot read image {bad}" in err
    err = error_of(capsys, ["detect", "--model", str(artifacts["onnx"]), str(tmp_path / "gone.jpg"), "--out", str(out)])
    assert f"image file not found: {tmp_path / 'gone.jpg'}" in err
    assert not out.exists()
