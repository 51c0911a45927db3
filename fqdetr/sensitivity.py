"""Per-layer sensitivity of a (quantized) DETR or Deformable DETR: Fisher traces of the overall, critical
and mixed objectives (docs/METHOD.md sections 2-3), and a Hutchinson Hessian-trace baseline.

Objectives are per-image: f(outputs, targets) -> [B] losses, image n's loss a function of
image n's outputs only, with a normaliser that does not depend on the batch (docs/METHOD.md
section 2.4: "fixed", the default, or "per_image"), as per-sample Fisher needs. Every image
is padded to the model's canvas, so the traces do not depend on how images are batched or
split across processes, up to float rounding (docs/METHOD.md section 7). Under torchrun every
process takes a shard of the images and the sums are all-reduced.
"""
import logging

import torch
from tqdm import tqdm

import fqkernels as fk
from fqdetr.critical import SELECTIVE_MODES, CriticalLoss, criterion_like, head_of
from fqdetr.engine.distributed import all_reduce_fisher, all_reduce_sum, rank
from fqdetr.fisher import FisherCollector, weights_requiring_grad
from fqdetr.models.criterion import weighted_loss
from fqdetr.models.deformable import DeformableDETR
from fqdetr.quant import quantized_weights

log = logging.getLogger(__name__)

# DETR's transformer and heads see sequence-first (or [layers, B, Q, d]) inputs: samples on dim 1.
DETR_BATCH_DIMS = {"transformer.*": 1, "class_embed": 1, "bbox_embed.*": 1}


def batch_dims_of(model):
    """FisherCollector batch_dims for ``model``: DETR_BATCH_DIMS, or none (every plain layer
    batch-first) for Deformable DETR, whose attention modules handle their own layout."""
    return {} if isinstance(model, DeformableDETR) else DETR_BATCH_DIMS


def _image(outputs, i):
    """Image i of a detector's output dict (aux and two-stage enc outputs included), as a batch of one."""
    if isinstance(outputs, dict):
        return {k: _image(v, i) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_image(v, i) for v in outputs]
    return outputs[i:i + 1]


NORMALIZERS = ("fixed", "per_image")


def mean_objects_per_image(dataset, labels=None):
    """Mean number of (non-crowd) annotated objects per image of a CocoDetection ``dataset``,
    counting only ``labels`` (contiguous label indices) when given; 1.0 when that mean is 0, so
    that it can divide. The fixed normaliser of docs/METHOD.md section 2.4."""
    wanted = set(range(dataset.num_classes) if labels is None else labels)
    total = sum(1 for i in dataset.ids for a in dataset.coco.imgToAnns.get(i, [])
                if not a.get("iscrowd", 0) and dataset.cat_id_to_label.get(a["category_id"]) in wanted)
    mean = total / max(len(dataset.ids), 1)
    return mean if mean > 0 else 1.0


def class_normalizer(criterion, num_queries, objects):
    """The total cross-entropy weight of an image with ``objects`` objects among ``num_queries``
    queries (objects weigh 1, the other queries eos_coef): the constant a softmax head's class
    loss is divided by under the fixed normaliser."""
    return objects + criterion.eos_coef * max(num_queries - objects, 0.0)


def _object_counts(criterion, targets):
    """[B] the objects each image's loss is normalised by (CriticalLoss knows its own)."""
    if isinstance(criterion, CriticalLoss):
        return criterion.num_objects(targets)
    return torch.tensor([float(len(t["labels"])) for t in targets])


def per_image(criterion, outputs, targets, normalizer="fixed", objects_per_image=1.0):
    """[B] losses, image n's entry a function of image n's outputs only (docs/METHOD.md section 2.4).

    criterion: a SetCriterion, DeformableSetCriterion or CriticalLoss; outputs: its output dict
    ([B, Q, ...] tensors); targets: B target dicts.
    normalizer "fixed": every image's terms summed and divided by the same constants, the
        normalisers DETR would use for an image with ``objects_per_image`` objects (box and focal
        terms by it, softmax cross-entropy by class_normalizer), in one batched call;
    normalizer "per_image": each image as if alone in its batch (its own object count, its own
        total class weight), one call per image.
    Neither depends on which images share a batch or a process.
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer: expected one of {NORMALIZERS}, got {normalizer!r}")
    if normalizer == "fixed":
        if not objects_per_image > 0:
            raise ValueError(f"objects_per_image: expected a positive number, got {objects_per_image}")
        num_queries = outputs["pred_logits"].shape[1]
        terms = criterion(outputs, targets, reduction="per_image", num_boxes=float(objects_per_image),
                          class_normalizer=class_normalizer(criterion, num_queries, objects_per_image))
        return weighted_loss(terms, criterion.weight_dict)
    losses = []
    for i, (t, n) in enumerate(zip(targets, _object_counts(criterion, targets).tolist())):
        terms = criterion(_image(outputs, i), [t], reduction="per_image", num_boxes=max(n, 1.0))
        losses.append(weighted_loss(terms, criterion.weight_dict)[0])
    return torch.stack(losses)


def detr_objectives(criterion, make_criterion, critical_labels, alpha=1.0, mode="lse", normalizer="fixed",
                    objects_per_image=1.0, critical_objects_per_image=None):
    """{"overall", "critical", "mix"}: per-image objectives f(outputs, targets) -> [B].

    criterion: the ordinary criterion, a SetCriterion (DETR, softmax head) or a
    DeformableSetCriterion (sigmoid focal head; T_S then follows docs/METHOD.md section 1.2's
    sigmoid form); make_criterion(num_classes) builds one for the transformed classes, None
    for a criterion of the same kind with the same matcher, weights and constants
    (fqdetr.critical.criterion_like); critical_labels: the set S; mode: T_S's mode
    (fqdetr.critical.MODES); mix = alpha * L_all + L_crit.
    normalizer: see ``per_image``; objects_per_image: its fixed constant for L_all and for the
    modes that keep every object; critical_objects_per_image: for "drop" and the selective
    modes, whose terms count only critical objects (default objects_per_image).
    mean_objects_per_image gives both from a dataset.
    """
    make_criterion = make_criterion or (lambda n: criterion_like(criterion, n))
    crit = CriticalLoss(critical_labels, criterion.num_classes, make_criterion, mode, head_of(criterion))
    critical_only = mode == "drop" or mode in SELECTIVE_MODES
    crit_objects = critical_objects_per_image if critical_only and critical_objects_per_image else objects_per_image

    def overall(outputs, targets):
        return per_image(criterion, outputs, targets, normalizer, objects_per_image)

    def critical(outputs, targets):
        return per_image(crit, outputs, targets, normalizer, crit_objects)

    return {"overall": overall, "critical": critical,
            "mix": lambda o, t: alpha * overall(o, t) + critical(o, t)}


def _batches(loader, num_batches):
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            return
        yield batch


def fisher_traces(model, loader, objective, num_batches=None, progress=True):
    """{layer: tr(F_l)} of ``objective`` over the images of ``loader`` (images, mask, targets)."""
    was_training = model.training
    model.eval()  # dropout off: the Fisher of the deployed model
    with FisherCollector(model, batch_dims=batch_dims_of(model)) as fc:
        for images, mask, targets in tqdm(_batches(loader, num_batches), total=num_batches, desc="fisher",
                                          disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            fc.backward(objective(model((images, mask)), targets))
    all_reduce_fisher(fc)  # under torchrun: every process gets the sums over all images
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    log.info("Fisher traces over %d images for %d layers", fc.num_samples, len(fc.sums))
    return fc.traces()


def _rademacher(shape, gen):
    """A Rademacher probe (+-1) [shape] drawn by ``gen`` on ``gen``'s device."""
    return torch.randint(0, 2, shape, generator=gen, device=gen.device).float() * 2 - 1


def _hutchinson_batch(weights, loss, probes, gen):
    """[layers] sum over this batch's images of v^T H_l v, averaged over ``probes`` probes."""
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    total = torch.zeros(len(weights), dtype=torch.float64, device=weights[0].device)
    for _ in range(probes):
        vs = [_rademacher(g.shape, gen) for g in grads]
        hvs = torch.autograd.grad(grads, weights, vs, retain_graph=True)
        total += torch.stack([(v * hv).sum().double() for v, hv in zip(vs, hvs)]) / probes
    return total


def clip_negative_traces(traces):
    """{layer: max(trace, 0)}, with a warning naming the clipped layers: a Hutchinson estimate of
    tr(H_l) can be negative (H need not be positive semi-definite, and the estimator is noisy),
    and fqdetr.allocate.sensitivities refuses negative traces (docs/METHOD.md section 3.3)."""
    negative = sorted(n for n, v in traces.items() if v < 0)
    if negative:
        log.warning("Hutchinson: %d layers have a negative trace estimate, clipped to 0: %s", len(negative),
                    ", ".join(f"{n} ({traces[n]:.3g})" for n in negative))
    return {n: max(v, 0.0) for n, v in traces.items()}


def hutchinson_traces(model, loader, objective, num_batches=None, probes=2, seed=0, progress=True):
    """{layer: tr(H_l)} per image by Hutchinson's estimator E[v^T H v] with Rademacher v, through
    the quantizers' straight-through estimator (double backward; the "hessian" baseline).

    Probes are drawn on the weights' device, seeded by ``seed`` and the process's rank; under
    torchrun the per-layer sums and image counts are all-reduced as the Fisher's are, so every
    process returns the estimate over all images. Negative estimates are clipped to 0
    (clip_negative_traces)."""
    weights = {n: w for n, (w, _) in quantized_weights(model).items()}
    params = list(weights.values())
    device = params[0].device
    gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 * rank())
    sums = torch.zeros(len(params), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for images, mask, targets in tqdm(_batches(loader, num_batches), total=num_batches, desc="hutchinson",
                                      disable=not progress, leave=False):
        with fk.differentiable(), weights_requiring_grad(params):  # frozen layers get a trace too
            sums += _hutchinson_batch(params, objective(model((images, mask)), targets).sum(), probes, gen)
        count += len(targets)
    all_reduce_sum(sums)
    all_reduce_sum(count)
    model.train(was_training)
    return clip_negative_traces(dict(zip(weights, (sums / count.clamp(min=1)).tolist())))
