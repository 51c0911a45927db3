"""Critical categories (docs/METHOD.md section 1): category sets, the logit-label
transformation T_S and the critical objective.

Class indices here are the model's contiguous labels 0..C-1 (no-object is C);
``category_sets`` maps COCO category ids/names/supercategories to them.

T_S per query, |S| + 2 logits:   [z_s for s in S] + [z_other] + [z_noobject]
    mode "lse":  z_other = logsumexp of the non-critical object logits, so that
                 softmax(T_S z) is exactly the marginal of softmax(z) (default)
    mode "max":  z_other = their max
    mode "drop": logits as "lse", and non-critical objects removed from the targets
Targets: a label in S becomes its position in S, any other label "other" (|S|).
"""
import torch

MODES = ("lse", "max", "drop")


def category_sets(categories, specs):
    """Resolves critical-set specs to contiguous label indices.

    categories: the COCO ``categories`` list ({id, name, supercategory}) in label order
        (label i is categories[i]).
    specs: iterable of specs, each a supercategory name, a category name, a category id,
        or a list of those (one set), or "each-supercategory" (one set per supercategory).
    Returns {set name: sorted list of label indices}.
    """
    by_name = {c["name"]: i for i, c in enumerate(categories)}
    by_id = {c["id"]: i for i, c in enumerate(categories)}
    supers = {}
    for i, c in enumerate(categories):
        supers.setdefault(c.get("supercategory", c["name"]), []).append(i)
    out = {}
    for spec in specs:
        if spec == "each-supercategory":
            out.update({name: labels for name, labels in supers.items()})
            continue
        items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        labels = set()
        for item in items:
            if item in supers:
                labels.update(supers[item])
            elif item in by_name:
                labels.add(by_name[item])
            elif isinstance(item, int) and item in by_id:
                labels.add(by_id[item])
            else:
                raise ValueError(f"critical set: {item!r} is neither a supercategory, a category name nor a "
                                 f"category id; supercategories: {sorted(supers)}")
        name = "+".join(str(i) for i in items)
        out[name] = sorted(labels)
    return out


def _check_set(S, num_classes):
    S = sorted(set(int(s) for s in S))
    if not S:
        raise ValueError("S: expected at least one critical class")
    if S[0] < 0 or S[-1] >= num_classes:
        raise ValueError(f"S: class indices must lie in 0..{num_classes - 1}, got {S}")
    return S


def transform_logits(logits, S, mode="lse"):
    """logits [..., C+1] (no-object last) -> [..., |S|+2]: critical, other, no-object."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    C = logits.shape[-1] - 1
    S = _check_set(S, C)
    keep = torch.tensor(S, device=logits.device)
    rest_mask = torch.ones(C, dtype=torch.bool, device=logits.device)
    rest_mask[keep] = False
    rest = logits[..., :C][..., rest_mask]
    if rest.shape[-1] == 0:  # S = all classes: "other" has probability 0
        other = torch.full_like(logits[..., :1], float("-inf"))
    elif mode == "max":
        other = rest.amax(dim=-1, keepdim=True)
    else:
        other = rest.logsumexp(dim=-1, keepdim=True)
    return torch.cat([logits[..., keep], other, logits[..., C:]], dim=-1)


def transform_targets(targets, S, num_classes, mode="lse"):
    """Relabels targets to T_S's classes (critical positions, then "other" = |S|)."""
    S = _check_set(S, num_classes)
    lut = torch.full((num_classes,), len(S), dtype=torch.long)
    lut[torch.tensor(S)] = torch.arange(len(S))
    out = []
    for t in targets:
        labels = lut.to(t["labels"].device)[t["labels"]]
        new = dict(t, labels=labels)
        if mode == "drop":
            keep = labels < len(S)
            new.update(labels=labels[keep], boxes=t["boxes"][keep])
        out.append(new)
    return out


def critical_transform(outputs, targets, S, mode="lse"):
    """T_S applied to a DETR output dict (and its aux outputs) and to the targets.

    outputs: {"pred_logits": [B, Q, C+1], "pred_boxes": [B, Q, 4], "aux_outputs": [...]}.
    Returns (outputs with pred_logits [B, Q, |S|+2], targets relabelled).
    """
    C = outputs["pred_logits"].shape[-1] - 1

    def one(o):
        return dict(o, pred_logits=transform_logits(o["pred_logits"], S, mode))

    new = one({k: v for k, v in outputs.items() if k != "aux_outputs"})
    if "aux_outputs" in outputs:
        new["aux_outputs"] = [one(a) for a in outputs["aux_outputs"]]
    return new, (transform_targets(targets, S, C, mode) if targets is not None else None)


class CriticalLoss(torch.nn.Module):
    """L_crit: the DETR set loss on T_S(outputs), T_S(targets), matching recomputed on the
    transformed probabilities.

    make_criterion(num_classes) builds a SetCriterion for |S|+1 object classes (critical +
    other) with the same matcher costs, weights and eos coefficient as the ordinary loss.
    """

    def __init__(self, S, num_classes, make_criterion, mode="lse"):
        super().__init__()
        self.S, self.mode, self.num_classes = _check_set(S, num_classes), mode, num_classes
        self.criterion = make_criterion(len(self.S) + 1)

    def forward(self, outputs, targets, reduction="batch", num_boxes=None):
        t_out, t_targets = critical_transform(outputs, targets, self.S, self.mode)
        return self.criterion(t_out, t_targets, reduction=reduction, num_boxes=num_boxes)
