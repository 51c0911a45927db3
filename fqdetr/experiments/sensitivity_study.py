"""Finding 1 (docs/METHOD.md section 6): does a group's Fisher trace predict how much AP it
loses under low-bit PTQ? Per category and per supercategory, the sum over layers of tr(F_l) of
the group's critical objective against its val AP drop under uniform ``finding1_bits`` PTQ, with
Spearman's rho and its permutation p-value (fqdetr.stats.permutation_pvalue).

The traces are taken on the model being allocated (the uniform PTQ model at the study's budget),
as the allocations' are, not on the float model.
"""
import copy

import torch

from fqdetr.critical import category_sets
from fqdetr.engine.loader import make_loader
from fqdetr.engine.quantize import quantize_detr
from fqdetr.sensitivity import detr_objectives, fisher_traces, mean_objects_per_image
from fqdetr.stats import permutation_pvalue

PERMUTATIONS = 10000


def mode_objectives(ctx, labels, mode):
    """detr_objectives of the critical set ``labels`` with T_S mode ``mode``, under the fixed
    normaliser: the training split's mean object count (all objects, and the critical ones for
    the modes whose terms count only critical objects)."""
    train = ctx.data["train"]
    return detr_objectives(ctx.criterion, None, labels, mode=mode, objects_per_image=mean_objects_per_image(train),
                           critical_objects_per_image=mean_objects_per_image(train, labels))


def groups_of(dataset):
    """({category name: [label]}, {supercategory: labels}) of a CocoDetection, in label order."""
    cats = dataset.coco.loadCats(dataset.cat_ids)
    supers = category_sets(cats, ["each-supercategory"])
    return {c["name"]: [k] for k, c in enumerate(cats) if c["name"] not in supers}, supers


def correlate(rows):
    """Spearman's rho of trace vs drop over ``rows`` and its permutation p-value."""
    rho, p = permutation_pvalue([r["fisher_trace"] for r in rows], [r["drop"] for r in rows], PERMUTATIONS)
    return {"rows": rows, "spearman": rho, "p_value": p, "n": len(rows)}


def sensitivity_vs_drop(ctx, uniform, cfg, float_val=None):
    """{"per_category", "per_supercategory": {"rows", "spearman", "p_value", "n"}, "mode",
    "w_bits", "images"}: each group's summed critical trace on ``uniform`` (mode ``cfg.finding1_mode``,
    over the first ``cfg.finding1_images`` of the seed's Fisher images)
    and its val AP drop float -> uniform ``cfg.finding1_bits``-bit PTQ. Groups whose AP is
    undefined are left out. float_val: the float model's val evaluation when already done."""
    float_val = float_val or ctx.val.evaluate(ctx.model, bootstrap=False)
    ptq = quantize_detr(ctx.model, w_bits=cfg.finding1_bits, calib_loader=ctx.fisher_loader)
    ptq_val = ctx.val.evaluate(ptq, bootstrap=False)
    categories, supers = groups_of(ctx.data["val"])
    images = ctx.fisher_loader.dataset
    if cfg.finding1_images is not None:  # its 20 traces dominate a seed's time: they may use fewer images
        images = torch.utils.data.Subset(images, range(min(cfg.finding1_images, len(images))))
    loader = make_loader(images, cfg.batch_size, ctx.canvas, shuffle=False)
    out = {"mode": cfg.finding1_mode, "w_bits": cfg.finding1_bits, "images": len(images)}
    for key, groups, ap_key in (("per_category", categories, "per_category"),
                                ("per_supercategory", supers, "critical")):
        rows = []
        for name, labels in groups.items():
            before, after = float_val[ap_key].get(name), ptq_val[ap_key].get(name)
            if before is None or after is None:
                continue
            objective = mode_objectives(ctx, labels, cfg.finding1_mode)["critical"]
            trace = sum(fisher_traces(copy.deepcopy(uniform), loader, objective, progress=False).values())
            rows.append({"group": name, "fisher_trace": trace, "float_AP": before, "ptq_AP": after,
                         "drop": before - after})
        out[key] = correlate(rows)
    return out
