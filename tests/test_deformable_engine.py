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


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A deformable_tiny trained for one epoch of 2 steps by ``fqdetr train`` (its run folder)."""
    from fqdetr.cli import main

    out = tmp_path_factory.mktemp("deformable_run")
    rc = main(["train", "--data", str(tiny_data), "--preset", "deformable_tiny", "--epochs", "1",
               "--batch-size", "4", "--image-size", "64", "--norm", "batch", "--hidden-dim", "32",
               "--nheads", "2", "--dim-feedforward", "64", "--enc-layers", "1", "--dec-layers", "2",
               "--num-queries", "10", "--enc-n-points", "2", "--dec-n-points", "2", "--threads", "1",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    return out


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
    result = evaluate_model(model, loader)
    assert len(result["detections"]) == 100 * len(val)
    assert 0.0 <= result["result"]["overall"]["AP"] <= 1.0
