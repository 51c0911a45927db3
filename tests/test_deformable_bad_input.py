"""Issue 13's bad input on Deformable DETR, the cases test_deformable.py does not cover: a level
count that does not match the weights or the feature maps, sampling points outside the map at the
module level, and images without objects through the matcher, per-image Fisher and a QAT step."""
import pytest
import torch

from fqdetr.data import make_builtin_dataset, max_size_for
from fqdetr.models import (FocalHungarianMatcher, MSDeformAttn, build_deformable_detr, load_detr_checkpoint,
                           save_detr_checkpoint)

NUM_CLASSES = 16  # categories of the built-in dataset
SMALL = dict(norm="batch", hidden_dim=32, nheads=2, dim_feedforward=64, enc_layers=1, dec_layers=2,
             num_queries=10, enc_n_points=2, dec_n_points=2)
EMPTY = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}


def test_own_checkpoint_whose_level_count_does_not_match_its_weights(tmp_path):
    path = tmp_path / "four_levels.pth"
    save_detr_checkpoint(build_deformable_detr("deformable_tiny", num_classes=5, **SMALL), path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["args"]["num_feature_levels"] = 3  # the weights hold 4 input projections
    torch.save(checkpoint, tmp_path / "three.pth")
    with pytest.raises(ValueError, match=r"three\.pth does not fit the model: .*unexpected keys: input_proj\.3"):
        load_detr_checkpoint(tmp_path / "three.pth")


def test_feature_maps_of_another_level_count_are_refused():
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=1)
    shapes = [(2, 3), (1, 2), (1, 1)]
    memory = torch.rand(1, sum(h * w for h, w in shapes), 8)
    with pytest.raises(ValueError, match="spatial_shapes has 3 levels, the module 2"):
        attn(torch.rand(1, 4, 8), torch.rand(1, 4, 3, 2), memory, shapes)


def test_reference_points_outside_the_map_read_zeros_through_the_module():
    """Every sampling point outside every level reads zero (as the official CUDA kernel): the
    output is output_proj applied to zeros, whatever the values."""
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    shapes = [(3, 4), (2, 2)]
    memory = torch.randn(1, 16, 8)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()  # the points sit on their reference point
    for far in (-3.0, 4.0):
        out = attn(torch.randn(1, 5, 8), torch.full((1, 5, 2, 2), far), memory, shapes)
        torch.testing.assert_close(out, attn.output_proj.bias.expand(1, 5, 8))
    inside = attn(torch.randn(1, 5, 8), torch.full((1, 5, 2, 2), 0.5), memory, shapes)
    assert not torch.allclose(inside, attn.output_proj.bias.expand(1, 5, 8))


def test_focal_matcher_with_images_without_objects():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_boxes": torch.rand(2, 5, 4) * 0.4 + 0.3}
    one = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    (src0, tgt0), (src1, tgt1) = FocalHungarianMatcher()(outputs, [EMPTY, one])
    assert src0.numel() == tgt0.numel() == 0 and tgt1.tolist() == [0] and len(src1) == 1
    for src, tgt in FocalHungarianMatcher()(outputs, [EMPTY, EMPTY]):
        assert src.numel() == tgt.numel() == 0
    with pytest.raises(ValueError, match="0 targets for a batch of 2"):
        FocalHungarianMatcher()(outputs, [])


@pytest.fixture(scope="module")
def empty_first_batch(tmp_path_factory):
    """(quantized small deformable_tiny, val dataset, a batch of 2 whose first image has no
    objects, its critical objectives) on 64 px built-in images."""
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.quantize import quantize_detr
    from fqdetr.engine.setup import critical_setup, load_datasets

    root = tmp_path_factory.mktemp("builtin")
    make_builtin_dataset(root, num_train=4, num_val=4, image_size=64, seed=3)
    torch.manual_seed(0)
    model = build_deformable_detr("deformable_tiny", num_classes=NUM_CLASSES, **SMALL).eval()
    qmodel = quantize_detr(model, w_bits=4)
    qmodel(torch.rand(2, 3, 64, 64))  # initialise the activation scales
    val = load_datasets(root, 64)["val"]
    images, mask, targets = next(iter(make_loader(val, 2, max_size_for(64), shuffle=False)))
    assert len(targets[1]["labels"]) > 0
    targets = [dict(targets[0], **EMPTY), targets[1]]
    criterion, objectives, _, _ = critical_setup(qmodel, val, "person")
    return qmodel, criterion, objectives, (images, mask, targets)


@pytest.mark.parametrize("objective", ["overall", "critical"])
def test_per_image_fisher_of_an_image_without_objects(empty_first_batch, objective):
    """The image without objects has a finite per-image loss and Fisher contribution (its queries all
    learn "no object"), and the fused per-image Fisher still equals one backward per image."""
    from fqdetr.fisher import FisherCollector
    from fqdetr.sensitivity import batch_dims_of

    qmodel, _, objectives, (images, mask, targets) = empty_first_batch
    losses = objectives[objective](qmodel((images, mask)), targets)
    assert losses.shape == (2,) and bool(torch.isfinite(losses).all()) and losses[0] > 0
    layers = ["transformer.decoder.layers.1.cross_attn.value_proj", "class_embed.0"]
    with FisherCollector(qmodel, layers=layers, batch_dims=batch_dims_of(qmodel)) as fc:
        fc.backward(objectives[objective](qmodel((images, mask)), targets))
    weights = {n: m.weight for n, m in qmodel.named_modules() if n in layers}
    expected = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    for i in range(2):
        qmodel.zero_grad()
        objectives[objective](qmodel((images[i:i + 1], mask[i:i + 1])), targets[i:i + 1]).sum().backward()
        for n, w in weights.items():
            expected[n] += w.grad.double().square()
    qmodel.zero_grad(set_to_none=True)
    for n, want in expected.items():
        assert bool(torch.isfinite(fc.sums[n]).all()) and want.norm() > 0, n
        assert (fc.sums[n].double() - want).norm() / want.norm() < 1e-4, n


def test_qat_step_with_an_image_without_objects(empty_first_batch):
    """One QAT step with the Fisher-trace regulariser on a batch whose first image has no objects:
    finite loss and penalty, and the weights move."""
    import copy

    from fqdetr.engine.qat import qat

    qmodel, criterion, objectives, batch = empty_first_batch
    qmodel = copy.deepcopy(qmodel)
    before = qmodel.class_embed[0].weight.detach().clone()
    history = qat(qmodel, criterion, [batch], 1, critical_objective=objectives["critical"], reg_lambda=0.05,
                  progress=False)
    assert len(history) == 1 and all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    assert history[0]["R"] > 0
    assert not torch.equal(qmodel.class_embed[0].weight, before)
