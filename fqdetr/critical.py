"""Critical categories (docs/METHOD.md section 1): category sets, the logit-label
transformation T_S and the critical objective, for softmax and sigmoid heads.

Class indices here are the model's contiguous labels 0..C-1 (softmax heads: no-object is C);
``category_sets`` maps COCO category ids/names/supercategories to them.

Softmax heads (DETR), T_S per query, |S| + 2 logits: [z_s for s in S] + [z_other] + [z_noobject]
    mode "lse":  z_other = logsumexp of the non-critical object logits, so that
                 softmax(T_S z) is exactly the marginal of softmax(z) (default)
    mode "max":  z_other = their max
    mode "drop": logits as "lse", and non-critical objects removed from the targets
Sigmoid heads (Deformable DETR, no no-object logit), |S| + 1 logits: [z_s for s in S] + [z_other]
    mode "lse":  z_other = logit of P(some non-critical class) = 1 - prod_j (1 - sigmoid(z_j)),
                 the noisy-or (``noisy_or_logit``) (default)
    mode "max":  z_other = their max
    mode "drop": no "other" logit (|S| logits), non-critical objects removed from the targets
Targets: a label in S becomes its position in S, any other label "other" (|S|).

Selective modes (docs/METHOD.md section 1.4), on the "lse" logits and targets, matching as "lse":
    "matched":  class and box terms only on the queries matched to critical objects
    "contrast": class term of S against the rest on every query (the rest down-weighted by the
                criterion's eos coefficient), box terms only on the critical matches
Both are divided by the number of critical objects.
"""
import torch
import torch.nn.functional as F

from fqdetr.models.criterion import SetCriterion
from fqdetr.models.deformable.criterion import DeformableSetCriterion, sigmoid_focal_loss

SELECTIVE_MODES = ("matched", "contrast")
MODES = ("lse", "max", "drop") + SELECTIVE_MODES
HEADS = ("softmax", "sigmoid")


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


def _check_options(mode, head):
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if head not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {head!r}")


def head_of(criterion):
    """"sigmoid" for a focal-loss criterion (Deformable DETR's), else "softmax"."""
    return "sigmoid" if isinstance(criterion, DeformableSetCriterion) else "softmax"


def _softplus(z):
    """log(1 + e^z), exact for every z (F.softplus returns z itself above 20, an error of
    e^-20 that float64 resolves)."""
    return torch.logaddexp(z, torch.zeros_like(z))


def _log_softplus(z):
    """log(softplus(z)) elementwise, accurate where softplus(z) underflows: for z < 0 it is
    z + log(log1p(u) / u), u = e^z, and log1p(u) / u -> 1 as u -> 0 (so -inf maps to -inf)."""
    neg = z < 0
    u = torch.exp(torch.where(neg, z, torch.zeros_like(z)))
    nonzero = u > 0
    u_safe = torch.where(nonzero, u, torch.ones_like(u))  # no 0/0 even in the branch where() drops
    below = z + torch.where(nonzero, torch.log(torch.log1p(u_safe) / u_safe), torch.zeros_like(u))
    above = torch.log(_softplus(torch.where(neg, torch.ones_like(z), z)))
    return torch.where(neg, below, above)


def _logsumexp(x, dim):
    """torch.logsumexp, but an all -inf slice gives -inf with a zero (not nan) gradient."""
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim)
    positive = s > 0
    log_s = torch.log(torch.where(positive, s, torch.ones_like(s)))
    return torch.where(positive, m.squeeze(dim) + log_s, torch.full_like(s, float("-inf")))


def noisy_or_logit(z, dim=-1):
    """logit(1 - prod_j (1 - sigmoid(z_j))) over ``dim``: [..., n, ...] -> [..., ...].

    With A = sum_j softplus(z_j) = -log P(no class), the result is log(expm1(A)), computed as
    A + log(-expm1(-A)) where A >= 1, and as log A + log(expm1(A) / A) below, with log A a
    logsumexp of log softplus(z_j), so that it stays exact where A underflows (every z_j very
    negative: the result tends to logsumexp_j z_j). +inf in z gives +inf, an all -inf slice
    -inf; gradients are finite for finite z (docs/METHOD.md section 1.2).
    """
    A = _softplus(z).sum(dim)
    large = A >= 1
    A_large = torch.where(large, A, torch.ones_like(A))
    from_A = A_large + torch.log(-torch.expm1(-A_large))
    # Only used where A < 1, i.e. every z_j < 0.55: the clamp keeps +inf out of its graph.
    log_A = _logsumexp(_log_softplus(z.clamp(max=1.0)), dim)
    log_A = torch.where(large, torch.zeros_like(log_A), log_A)
    A_small = torch.exp(log_A).clamp(min=torch.finfo(z.dtype).tiny)
    from_log_A = log_A + torch.log(torch.expm1(A_small) / A_small)
    return torch.where(large, from_A, from_log_A)


def _other_logit(rest, mode, head):
    """The "other" logit [..., 1] from the non-critical logits [..., n]."""
    if rest.shape[-1] == 0:
        # "other" has probability 0. Sigmoid heads take the lowest finite value: the focal
        # loss of a -inf logit is nan (0 * inf), of this one exactly 0.
        fill = float("-inf") if head == "softmax" else torch.finfo(rest.dtype).min
        return rest.new_full((*rest.shape[:-1], 1), fill)
    if mode == "max":
        return rest.amax(dim=-1, keepdim=True)
    if head == "sigmoid":
        return noisy_or_logit(rest)[..., None]
    return rest.logsumexp(dim=-1, keepdim=True)


def transform_logits(logits, S, mode="lse", head="softmax"):
    """T_S of a query's logits.

    softmax: logits [..., C+1] (no-object last) -> [..., |S|+2]: critical, other, no-object.
    sigmoid: logits [..., C] -> [..., |S|+1]: critical, other ("drop": [..., |S|], critical only).
    """
    _check_options(mode, head)
    C = logits.shape[-1] - (1 if head == "softmax" else 0)
    S = _check_set(S, C)
    keep = torch.tensor(S, device=logits.device)
    if head == "sigmoid" and mode == "drop":
        return logits[..., keep]
    rest_mask = torch.ones(C, dtype=torch.bool, device=logits.device)
    rest_mask[keep] = False
    other = _other_logit(logits[..., :C][..., rest_mask], mode, head)
    return torch.cat([logits[..., keep], other, logits[..., C:]], dim=-1)


def transform_targets(targets, S, num_classes, mode="lse"):
    """Relabels targets to T_S's classes (critical positions, then "other" = |S|); "drop"
    removes the non-critical objects instead. The same for both heads."""
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


def critical_transform(outputs, targets, S, mode="lse", head="softmax"):
    """T_S applied to a detector's output dict (and its aux outputs) and to the targets.

    outputs: {"pred_logits": [B, Q, C+1] (softmax) or [B, Q, C] (sigmoid), "pred_boxes":
    [B, Q, 4], "aux_outputs": [...]}. Two-stage ``enc_outputs`` (class-agnostic proposals)
    pass unchanged. Returns (outputs with T_S's pred_logits, targets relabelled).
    """
    C = outputs["pred_logits"].shape[-1] - (1 if head == "softmax" else 0)

    def one(o):
        return dict(o, pred_logits=transform_logits(o["pred_logits"], S, mode, head))

    new = one({k: v for k, v in outputs.items() if k != "aux_outputs"})
    if "aux_outputs" in outputs:
        new["aux_outputs"] = [one(a) for a in outputs["aux_outputs"]]
    return new, (transform_targets(targets, S, C, mode) if targets is not None else None)


def transformed_num_classes(num_critical, mode="lse", head="softmax"):
    """Object classes of T_S (the criterion's ``num_classes``): critical + "other", except
    for sigmoid heads in "drop" mode, which have no "other" logit."""
    _check_options(mode, head)
    return num_critical + (0 if head == "sigmoid" and mode == "drop" else 1)


def criterion_like(criterion, num_classes):
    """A criterion of ``criterion``'s kind for ``num_classes`` classes, with the same matcher,
    loss weights and losses, and the same no-object weight (softmax) or focal constants (sigmoid)."""
    if isinstance(criterion, DeformableSetCriterion):
        return DeformableSetCriterion(num_classes, criterion.matcher, criterion.weight_dict,
                                      focal_alpha=criterion.focal_alpha, focal_gamma=criterion.focal_gamma,
                                      losses=criterion.losses)
    if isinstance(criterion, SetCriterion):
        return SetCriterion(num_classes, criterion.matcher, criterion.weight_dict, eos_coef=criterion.eos_coef,
                            losses=criterion.losses)
    raise TypeError(f"criterion: expected a SetCriterion or DeformableSetCriterion, got {type(criterion).__name__}")


def _class_term(criterion, logits, matched, labels, num_critical, mode):
    """[B] per-image class term of a selective mode, unnormalised.

    logits: T_S logits [B, Q, |S|+2] (softmax) or [B, Q, |S|+1] (sigmoid); matched: (batch
    index [N], query index [N]) of the queries matched to critical objects, labels [N] their
    positions in S. "matched" sums the class loss over those queries; "contrast" scores S
    against the rest on every query, other and no-object merged into one rest class
    (softmax) or the "other" column left out (sigmoid), the rest queries weighted eos_coef.
    """
    B, Q = logits.shape[:2]
    target = torch.full((B, Q), num_critical, dtype=torch.long, device=logits.device)
    target[matched] = labels.to(logits.device)
    is_critical = torch.zeros(B, Q, dtype=torch.bool, device=logits.device)
    is_critical[matched] = True
    if mode == "contrast" and head_of(criterion) == "softmax":
        logits = torch.cat([logits[..., :num_critical], logits[..., num_critical:].logsumexp(-1, keepdim=True)], -1)
    elif mode == "contrast":
        logits = logits[..., :num_critical]
    if head_of(criterion) == "sigmoid":
        onehot = F.one_hot(target, num_critical + 1)[..., :logits.shape[-1]].to(logits)
        loss = sigmoid_focal_loss(logits, onehot, criterion.focal_alpha, criterion.focal_gamma).sum(-1)
    else:
        loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    rest_weight = 0.0 if mode == "matched" else criterion.eos_coef
    # where, not a product: a rest query's loss is inf when S holds every class ("other" is
    # -inf), and 0 * inf would be nan.
    return torch.where(is_critical, loss, loss * rest_weight if rest_weight else torch.zeros_like(loss)).sum(1)


def selective_terms(criterion, outputs, targets, num_critical, mode):
    """{"loss_ce", "loss_bbox", "loss_giou" (+ "_{i}" per aux output): [B]} per-image sums of a
    selective mode ("matched" or "contrast") on T_S(outputs), T_S(targets) (critical labels
    0..num_critical-1), not yet divided by the number of critical objects. Each output is
    matched to all transformed targets by ``criterion.matcher`` and only the pairs whose
    target is critical are kept. Two-stage ``enc_outputs`` are left out: they are class-agnostic."""
    levels = [("", outputs)] + [(f"_{i}", a) for i, a in enumerate(outputs.get("aux_outputs", []))]
    out = {}
    for suffix, level in levels:
        critical = []  # per image: (queries, targets) of the pairs whose target is critical
        for (src, tgt), t in zip(criterion.matcher(level, targets), targets):
            keep = t["labels"][tgt].to(src.device) < num_critical
            critical.append((src[keep], tgt[keep]))
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(critical)])
        query_idx = torch.cat([src for src, _ in critical])
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, critical)])
        boxes = criterion.loss_boxes(level, targets, critical, 1.0, per_image=True)
        out["loss_ce" + suffix] = _class_term(criterion, level["pred_logits"], (batch_idx, query_idx), labels,
                                              num_critical, mode)
        out.update({k + suffix: v for k, v in boxes.items()})
    return out


class CriticalLoss(torch.nn.Module):
    """L_crit: the detector's set loss on T_S(outputs), T_S(targets), matching recomputed on the
    transformed logits (softmax: CE with the eos weight; sigmoid: the focal loss and cost), or
    a selective mode's terms (``selective_terms``).

    make_criterion(num_classes) builds the criterion for T_S's transformed_num_classes, with
    the same matcher costs, weights and eos coefficient / focal constants as the ordinary loss;
    ``weight_dict`` and ``eos_coef`` are that criterion's.
    """

    def __init__(self, S, num_classes, make_criterion, mode="lse", head="softmax"):
        super().__init__()
        _check_options(mode, head)
        self.S, self.mode, self.head, self.num_classes = _check_set(S, num_classes), mode, head, num_classes
        self.criterion = make_criterion(transformed_num_classes(len(self.S), mode, head))
        self.weight_dict, self.eos_coef = self.criterion.weight_dict, self.criterion.eos_coef

    def transform(self, outputs, targets):
        """(T_S(outputs), T_S(targets)) for this loss's set, mode and head."""
        return critical_transform(outputs, targets, self.S, self.mode, self.head)

    def num_objects(self, targets):
        """[B] float: the objects each image's loss is normalised by: the critical ones in the
        modes whose box terms see only those ("drop" and the selective modes), else all."""
        if self.mode == "drop" or self.mode in SELECTIVE_MODES:
            S = torch.tensor(self.S)
            return torch.stack([torch.isin(t["labels"].cpu(), S).sum() for t in targets]).float()
        return torch.tensor([float(len(t["labels"])) for t in targets])

    def forward(self, outputs, targets, reduction="batch", num_boxes=None, class_normalizer=None):
        """As the criterion's forward: {name: scalar} or, ``reduction="per_image"``, {name: [B]}.
        Selective modes divide every term by ``num_boxes`` (default: the batch's critical
        objects, at least 1) and ignore ``class_normalizer``."""
        t_out, t_targets = self.transform(outputs, targets)
        if self.mode not in SELECTIVE_MODES:
            return self.criterion(t_out, t_targets, reduction=reduction, num_boxes=num_boxes,
                                  class_normalizer=class_normalizer)
        if reduction not in ("batch", "per_image"):
            raise ValueError(f"reduction must be 'batch' or 'per_image', got {reduction!r}")
        norm = num_boxes if num_boxes is not None else max(float(self.num_objects(targets).sum()), 1.0)
        terms = {k: v / norm for k, v in selective_terms(self.criterion, t_out, t_targets, len(self.S),
                                                           self.mode).items()}
        return terms if reduction == "per_image" else {k: v.sum() for k, v in terms.items()}
