"""Deformable DETR through the engine and the CLI: family dispatch, training, evaluation,
checkpoints, quantization, Fisher and the commands."""
import pytest
import torch

from fqdetr.data import make_builtin_dataset, max_size_for
from fqdetr.engine import family as families
from fqdetr.engine.train import LINEAR_PROJ_LR_MULT, param_groups
from fqdetr.models import (DeformableDETR, DeformableSetCriterion, DETR, PostProcess, SetCriterion,
                           TopKPostProcess, build_deformable_detr, load_detr_checkpoint)

NUM_CLASSES = 16  # categories of the built-in dataset
# deformable_tiny made smaller still, so that these tests stay fast.
SMALL = dict(norm="batch", hidden_dim=32, nheads=2, dim_feedforward=64, enc_layers=1, dec_layers=2,
             num_queries=10, enc_n_points=2, dec_n_points=2)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin")
    make_builtin_dataset(root, num_train=8, num_val=4, image_size=64, seed=3)
    return root


SMALL_FLAGS = ["--norm", "batch", "--hidden-dim", "32", "--nheads", "2", "--dim-feedforward", "64", "--enc-layers",
               "1", "--dec-layers", "2", "--num-queries", "10"]


def _train(data, out, preset, *flags):
    """``fqdetr train`` of ``preset`` (made small) for one epoch of 2 steps on 64 px images."""
    from fqdetr.cli import main

    rc = main(["train", "--data", str(data), "--preset", preset, "--epochs", "1", "--batch-size", "4",
               "--image-size", "64", *SMALL_FLAGS, *flags, "--threads", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A deformable_tiny trained for one epoch of 2 steps by ``fqdetr train`` (its run folder)."""
    return _train(tiny_data, tmp_path_factory.mktemp("deformable_run"), "deformable_tiny",
                  "--enc-n-points", "2", "--dec-n-points", "2")


def test_the_preset_chooses_the_family():
    for preset, model_type, criterion_type, post_type in (
            ("tiny", DETR, SetCriterion, PostProcess),
            ("deformable_tiny", DeformableDETR, DeformableSetCriterion, TopKPostProcess)):
        family = families.family_of_preset(preset)
        model = families.build_model(preset, NUM_CLASSES, num_queries=10)
        assert type(model) is model_type and families.family_of(model) is family
        assert families.num_classes_of(model) == NUM_CLASSES
        assert type(families.criterion_for(model)) is criterion_type
        assert type(families.postprocess_for(model)) is post_type
    with pytest.raises(ValueError, match="unknown preset 'nope'.*deformable_tiny"):
        families.family_of_preset("nope")


def test_class_probabilities_follow_the_head():
    logits = torch.randn(2, 5, 4)
    deformable = build_deformable_detr("deformable_tiny", num_classes=4, **SMALL)
    torch.testing.assert_close(families.class_probabilities(deformable, logits), logits.sigmoid())
    detr = families.build_model("tiny", 3, num_queries=5)
    torch.testing.assert_close(families.class_probabilities(detr, logits), logits.softmax(-1))


def test_two_stage_criterion_scores_the_encoder_proposals():
    model = build_deformable_detr("deformable_r50_two_stage", num_classes=3, backbone="resnet18",
                                  backbone_width=8, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2,
                                  dim_feedforward=32, num_queries=5)
    weights = families.criterion_for(model).weight_dict
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "loss_ce_0"} <= set(weights)


def test_sampling_offsets_and_reference_points_train_at_a_tenth_of_the_lr():
    model = build_deformable_detr("deformable_tiny", num_classes=NUM_CLASSES, **SMALL)
    groups = param_groups(model, lr=1e-3, lr_backbone=5e-4)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    slow = [g for g in groups if g["lr"] == pytest.approx(1e-3 * LINEAR_PROJ_LR_MULT)]
    assert len(slow) == 1 and slow[0]["params"]
    assert all("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)] for p in slow[0]["params"])
    assert sum(len(g["params"]) for g in groups) == len(names)  # each trainable parameter in one group
    detr_groups = param_groups(families.build_model("tiny", NUM_CLASSES), lr=1e-3, lr_backbone=5e-4)
    assert [g["lr"] for g in detr_groups] == [1e-3, 5e-4]


def test_train_writes_a_deformable_checkpoint_that_rebuilds(trained):
    best = torch.load(trained / "best.pth", weights_only=True)
    assert best["family"] == "deformable_detr" and best["canvas"] == max_size_for(64) and best["image_size"] == 64
    assert best["args"]["enc_n_points"] == 2 and best["args"]["norm"] == "batch"
    model = load_detr_checkpoint(trained / "best.pth")
    assert isinstance(model, DeformableDETR) and model.num_queries == 10
    state = torch.load(trained / "checkpoint.pth", weights_only=True)
    assert state["family"] == "deformable_detr" and state["step"] == 2
    report = (trained / "eval" / "report.md").read_text()
    assert "Deformable DETR" in report


def test_train_flag_chooses_box_refinement(tiny_data, tmp_path):
    out = _train(tiny_data, tmp_path / "refine", "deformable_tiny", "--with-box-refine")
    model = load_detr_checkpoint(out / "best.pth")
    assert model.with_box_refine and not model.two_stage
    assert len(model.class_embed) == 2 and model.class_embed[0] is not model.class_embed[1]  # one head per layer


@pytest.mark.parametrize("flags, message", [
    (["--preset", "tiny", "--with-box-refine"], "--with-box-refine: only for Deformable DETR presets"),
    (["--preset", "tiny", "--two-stage", "--enc-n-points", "2"],
     "--enc-n-points, --two-stage: only for Deformable DETR presets"),
    (["--preset", "deformable_tiny", "--two-stage"], "two_stage requires with_box_refine"),
])
def test_train_rejects_deformable_flags_that_do_not_apply(tiny_data, tmp_path, flags, message, capsys):
    from fqdetr.cli import main

    rc = main(["train", "--data", str(tiny_data), "--epochs", "1", *flags, "--out", str(tmp_path / "run")])
    assert rc == 2 and message in capsys.readouterr().err


def test_evaluation_keeps_the_best_pairs_per_image(trained, tiny_data):
    from fqdetr.engine import evaluate_model, make_loader, predict
    from fqdetr.engine.setup import checkpoint_geometry, load_datasets

    model = load_detr_checkpoint(trained / "best.pth")
    image_size, canvas = checkpoint_geometry(trained / "best.pth")
    val = load_datasets(tiny_data, image_size)["val"]
    loader = make_loader(val, 2, canvas, shuffle=False)
    preds, ids, probs = predict(model, loader)
    # 10 queries x 16 sigmoid classes: the 100 best (query, class) pairs, best first
    assert all(len(p["scores"]) == 100 and bool((p["scores"].diff() <= 0).all()) for p in preds)
    assert all(p.shape == (10, NUM_CLASSES) and bool(((p >= 0) & (p <= 1)).all()) for p in probs)
    result = evaluate_model(model, loader, critical_sets=["person"], transformed=True)
    assert len(result["detections"]) == 100 * len(val)
    assert 0.0 <= result["result"]["overall"]["AP"] <= 1.0
    # critical AP of the transformed sigmoid probabilities, one box per query
    transformed = result["result"]["critical_transformed"]
    assert set(transformed) == {"person"} and 0.0 <= transformed["person"]["AP"] <= 1.0


def _quantized_small(**overrides):
    """A quantized (w4a8, 8-bit first conv and heads) small deformable_tiny, scales set on noise."""
    from fqdetr.engine.quantize import quantize_detr

    model = build_deformable_detr("deformable_tiny", num_classes=NUM_CLASSES, **{**SMALL, **overrides}).eval()
    qmodel = quantize_detr(model, w_bits=4)
    qmodel(torch.rand(2, 3, 64, 64))  # initialise the activation scales
    return qmodel


@pytest.mark.parametrize("overrides", [{}, {"with_box_refine": True}])
def test_heads_and_first_conv_stay_at_8_bits_and_shared_heads_stay_shared(overrides):
    from fqdetr.engine.quantize import fixed_bounds
    from fqdetr.quant import QuantConv2d, QuantLinear, quantized_modules, to_float

    qmodel = _quantized_small(**overrides)
    modules = quantized_modules(qmodel)
    bounds = fixed_bounds(qmodel)
    heads = [n for n in modules if "class_embed" in n or "bbox_embed" in n]
    assert heads and set(bounds) == {"backbone.0.body.conv1", *heads}
    assert all(modules[n].weight_quantizer.bits == 8 for n in bounds)
    assert all(m.weight_quantizer.bits == 4 for n, m in modules.items() if n not in bounds)
    # every decoder layer's head is quantized, the final one included
    assert all(isinstance(head, QuantLinear) for head in qmodel.class_embed)
    assert (qmodel.class_embed[0] is qmodel.class_embed[-1]) == (not overrides)
    # input projections: the convolutions quantized, GroupNorm left float
    assert isinstance(qmodel.input_proj[0][0], QuantConv2d) and type(qmodel.input_proj[0][1]) is torch.nn.GroupNorm
    restored = to_float(qmodel)
    assert type(restored.class_embed[-1]) is torch.nn.Linear
    assert (restored.class_embed[0] is restored.class_embed[-1]) == (not overrides)


# Fake quantization on: a float32 rounding difference between the batched and the one-image
# convolutions can move a backbone activation across a rounding boundary (docs/METHOD.md section 7),
# so the backbone is compared with fake quantization off, where the two agree to float32 rounding.
FISHER_LAYERS = {False: ["backbone.0.body.layer1.0.conv1", "input_proj.1.0"],
                 True: ["transformer.encoder.layers.0.self_attn.sampling_offsets",
                        "transformer.decoder.layers.1.cross_attn.value_proj", "transformer.decoder.layers.0.linear2",
                        "class_embed.0", "bbox_embed.0.layers.2"]}


@pytest.mark.parametrize("fake_quant, objective", [(False, "overall"), (True, "critical")])
def test_fisher_collector_matches_a_per_image_autograd_loop(tiny_data, fake_quant, objective):
    """Exact per-image Fisher on the quantized deformable model: one backward per image gives the
    same sum of squared gradients, for a backbone conv, an input projection, deformable attention's
    projections, an FFN and the head shared by both decoder layers (focal and critical objectives)."""
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.setup import critical_setup, load_datasets
    from fqdetr.fisher import FisherCollector
    from fqdetr.quant import set_fake_quant
    from fqdetr.sensitivity import batch_dims_of

    qmodel = set_fake_quant(_quantized_small(), fake_quant)
    val = load_datasets(tiny_data, 64)["val"]
    images, mask, targets = next(iter(make_loader(val, 2, max_size_for(64), shuffle=False)))
    _, objectives, _, _ = critical_setup(qmodel, val, "person")
    layers = FISHER_LAYERS[fake_quant] + (FISHER_LAYERS[True] if not fake_quant else [])
    weights = {n: m.weight for n, m in qmodel.named_modules() if n in layers}
    with FisherCollector(qmodel, layers=layers, batch_dims=batch_dims_of(qmodel)) as fc:
        fc.backward(objectives[objective](qmodel((images, mask)), targets))
    expected = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    for i in range(len(targets)):
        qmodel.zero_grad()
        objectives[objective](qmodel((images[i:i + 1], mask[i:i + 1])), targets[i:i + 1]).sum().backward()
        for n, w in weights.items():
            expected[n] += w.grad.double().square()
    assert set(fc.sums) == set(layers) and fc.num_samples == 2
    for n, want in expected.items():
        assert want.norm() > 0, (objective, n)
        assert (fc.sums[n].double() - want).norm() / want.norm() < 1e-4, (objective, n)


def test_upweighting_the_critical_classes_scales_their_focal_terms():
    from fqdetr.engine.qat import upweighted_criterion

    model = build_deformable_detr("deformable_tiny", num_classes=4, **SMALL).eval()
    criterion = families.criterion_for(model)
    outputs = model(torch.rand(2, 3, 64, 64))
    targets = [{"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[.5, .5, .2, .2], [.3, .3, .1, .2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[.6, .4, .3, .3]])}]
    base = criterion(outputs, targets)["loss_ce"]
    every_class = upweighted_criterion(criterion, range(4), 3.0)(outputs, targets)["loss_ce"]
    torch.testing.assert_close(every_class, 3 * base)
    some = upweighted_criterion(criterion, [3], 3.0)(outputs, targets)["loss_ce"]
    assert base < some < 3 * base
    assert criterion.class_weight is None  # the original is left alone


def test_demo_reports_each_detector(tiny_data, trained, tmp_path):
    """``fqdetr demo`` with a DETR and a Deformable DETR checkpoint: a folder per detector with the
    usual methods, and one report with a section per detector."""
    import json

    from fqdetr.cli import main

    detr = _train(tiny_data, tmp_path / "detr_run", "tiny")
    models = {"detr_small": tmp_path / "detr_small.pth", "deformable_small": tmp_path / "deformable_small.pth"}
    models["detr_small"].write_bytes((detr / "best.pth").read_bytes())
    models["deformable_small"].write_bytes((trained / "best.pth").read_bytes())
    out = tmp_path / "demo"
    model_flags = [a for path in models.values() for a in ("--model", str(path))]
    rc = main(["demo", "--out", str(out), "--data", str(tiny_data), *model_flags,
               "--qat-steps", "1", "--fisher-images", "4", "--eval-images", "4", "--batch-size", "2"])
    assert rc == 0
    combined = json.loads((out / "results.json").read_text())
    assert list(combined) == list(models)
    methods = ["float", "ptq uniform w4a8", "ptq fisher-overall", "ptq fisher-critical", "qat",
               "qat + fisher-trace reg", "qat + critical up-weighted"]
    for name, title in (("detr_small", "DETR"), ("deformable_small", "Deformable DETR")):
        assert combined[name]["config"]["detector"] == title
        assert list(combined[name]["methods"]) == methods
        critical = combined[name]["traces"]["critical"].values()
        assert all(t >= 0 for t in critical) and sum(critical) > 0  # all zero: no gradient reached a layer
        assert (out / name / "report.md").is_file() and (out / name / "layers.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## DETR: `detr_small`" in report and "## Deformable DETR: `deformable_small`" in report
    assert "(deformable_small/layers.png)" in report and report.count("| qat + critical up-weighted |") == 2


def test_fisher_allocate_ptq_qat_chain_on_a_deformable_checkpoint(trained, tiny_data, tmp_path):
    import json

    from fqdetr.cli import main

    common = ["--model", str(trained / "best.pth"), "--data", str(tiny_data), "--batch-size", "2",
              "--eval-images", "4", "--image-size", "64"]
    assert main(["fisher", *common, "--out", str(tmp_path / "f"), "--images", "4"]) == 0
    traces = json.loads((tmp_path / "f" / "fisher.json").read_text())
    assert {"overall", "critical"} <= set(traces) and all(v >= 0 for v in traces["critical"].values())
    assert sum(traces["critical"].values()) > 0  # all zero: no gradient reached a layer
    assert {"class_embed.0", "input_proj.3.0", "transformer.encoder.layers.0.self_attn.sampling_offsets"} <= set(
        traces["overall"])
    assert main(["allocate", "--model", str(trained / "best.pth"), "--fisher", str(tmp_path / "f/fisher.json"),
                 "--out", str(tmp_path / "a"), "--budget", "4"]) == 0
    alloc = json.loads((tmp_path / "a" / "allocation.json").read_text())
    assert alloc["class_embed.0"]["w_bits"] == 8 and alloc["bbox_embed.0.layers.2"]["w_bits"] == 8
    assert set(alloc) == set(traces["critical"])
    assert main(["ptq", *common, "--out", str(tmp_path / "p"), "--allocation", str(tmp_path / "a/allocation.json"),
                 "--calib-batches", "1"]) == 0
    assert 0.0 <= json.loads((tmp_path / "p" / "ptq.json").read_text())["eval"]["val"]["mAP"] <= 1.0
    assert main(["qat", *common, "--out", str(tmp_path / "q"), "--steps", "1", "--upweight", "3"]) == 0
    assert len(json.loads((tmp_path / "q" / "qat.json").read_text())["history"]) == 1


def _one_line_error(capsys, argv):
    from fqdetr.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_bad_deformable_input_gets_one_line_errors(trained, tiny_data, tmp_path, capsys):
    from fqdetr.models import save_detr_checkpoint

    common = ["--data", str(tiny_data), "--batch-size", "2", "--eval-images", "2", "--out", str(tmp_path / "o")]
    # a checkpoint of neither family
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    assert "unknown architecture" in _one_line_error(capsys, ["fisher", "--model", str(tmp_path / "other.pth"), *common])
    # feature levels that do not match the backbone (an input projection reading the wrong channels),
    # in a file without args, as the official ones: the architecture is inferred from the shapes
    state = torch.load(trained / "best.pth", weights_only=True)
    state["model"]["input_proj.0.0.weight"] = state["model"]["input_proj.0.0.weight"][:, :8]
    torch.save({"model": state["model"]}, tmp_path / "levels.pth")
    assert "do not match its backbone" in _one_line_error(
        capsys, ["ptq", "--model", str(tmp_path / "levels.pth"), *common])
    # a model trained on other categories than the data's
    model = build_deformable_detr("deformable_tiny", num_classes=5, **SMALL)
    save_detr_checkpoint(model, tmp_path / "five.pth")
    assert "5 classes" in _one_line_error(capsys, ["qat", "--model", str(tmp_path / "five.pth"), *common])
    # a preset of neither family, a Deformable-only flag on a DETR preset
    train = ["train", "--data", str(tiny_data), "--epochs", "1", "--out", str(tmp_path / "t")]
    assert "unknown preset 'deformable_big'" in _one_line_error(capsys, [*train, "--preset", "deformable_big"])
    assert "--dec-n-points" in _one_line_error(capsys, [*train, "--preset", "tiny", "--dec-n-points", "2"])
    assert "num_feature_levels=2" in _one_line_error(
        capsys, [*train, "--preset", "deformable_tiny", "--num-feature-levels", "2"])
    # the demo with no model at all
    assert "does not exist" in _one_line_error(capsys, ["demo", "--model", str(tmp_path / "none.pth"), "--out",
                                                        str(tmp_path / "d")])


def test_eval_runs_a_checkpoint_of_either_family(trained, tiny_data, tmp_path, capsys):
    import json

    from fqdetr.cli import main

    detr = _train(tiny_data, tmp_path / "detr_run", "tiny")
    for name, run in (("detr", detr), ("deformable", trained)):
        out = tmp_path / name
        assert main(["eval", "--model", str(run / "best.pth"), "--data", str(tiny_data), "--batch-size", "2",
                     "--critical", "person,animal", "--no-plots", "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        detections = json.loads((out / "detections.json").read_text())
        per_image = 100 if name == "deformable" else 10  # top-k pairs vs one per query
        assert report["num_images"] == 4 and len(detections) == 4 * per_image
        assert set(report["critical"]) == {"person", "animal"}
    assert "not both" in _one_line_error(capsys, ["eval", "--model", str(trained / "best.pth"), "--gt", "a.json",
                                                  "--detections", "b.json"])
    assert "are required" in _one_line_error(capsys, ["eval", "--data", str(tiny_data)])


def test_a_deformable_run_resumes_with_its_architecture(trained, tiny_data, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(trained, out)
    from fqdetr.cli import main

    # --preset and the model flags are ignored on resume: the checkpoint gives the architecture
    assert main(["train", "--data", str(tiny_data), "--resume", str(out / "checkpoint.pth"), "--epochs", "2",
                 "--batch-size", "4", "--image-size", "64", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == 4 and state["family"] == "deformable_detr" and state["canvas"] == max_size_for(64)
    assert state["args"]["enc_n_points"] == 2 and state["args"]["hidden_dim"] == 32
