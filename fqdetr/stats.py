"""Statistics of the findings (docs/METHOD.md section 6): paired bootstrap intervals of COCO AP
differences, intervals across seeds, and a permutation p-value for a rank correlation.

Paired bootstrap over val images: a resample draws the I val images with replacement; both arms
are evaluated on the same resample, so the interval is that of the difference on one image
set, not of two independent APs. pycocotools runs once per arm: COCOeval.evaluate() gives the
per-image matches (evalImgs), and ``weighted_ap`` accumulates them with image multiplicities
w [I] (a resample) instead of re-running COCOeval per resample. With w = 1 it is exactly
COCOeval.accumulate() + summarize()'s AP (same arrays, same order, same float operations).

A duplicated image contributes each detection w times; COCOeval on a dataset holding the image
w times would put the copies next to each other in its score order (ties between different
detections aside), so its precision envelope, hence its AP, equals the weighted cumulative
sums used here (tested against such a duplicated dataset).
"""
import itertools
import math

import numpy as np
from scipy.stats import rankdata
from scipy.stats import t as student_t

AREA_ALL = 0  # COCOeval.params.areaRng index of "all"


class MatchTable:
    """Per-category detections of one arm, from an evaluated COCOeval (area "all", the largest
    maxDets, as summarize()'s AP).

    For category id c, ``cats[c]`` = (image index [D] into ``image_ids``, matched [T, D] bool,
    ignored [T, D] bool, non-ignored gt count per image [I]), detections in COCOeval's
    accumulate order (images in ``image_ids`` order, stably sorted by descending score).
    """

    def __init__(self, E):
        if not getattr(E, "evalImgs", None):
            raise ValueError("E: expected a COCOeval after evaluate() (its evalImgs is empty)")
        p = E.params
        self.image_ids = list(p.imgIds)
        self.recall_thresholds = np.asarray(p.recThrs)
        self.num_iou = len(p.iouThrs)
        max_det, n_img, n_area = p.maxDets[-1], len(p.imgIds), len(p.areaRng)
        self.cats = {}
        for k, cat_id in enumerate(p.catIds):
            base = k * n_area * n_img + AREA_ALL * n_img
            per_image = [(i, E.evalImgs[base + i]) for i in range(n_img)]
            per_image = [(i, e) for i, e in per_image if e is not None]
            self.cats[cat_id] = self._category(per_image, max_det, n_img) if per_image else None

    def _category(self, per_image, max_det, n_img):
        scores = np.concatenate([e["dtScores"][:max_det] for _, e in per_image])
        order = np.argsort(-scores, kind="mergesort")  # accumulate()'s sort
        image = np.concatenate([np.full(len(e["dtScores"][:max_det]), i) for i, e in per_image]).astype(np.int64)
        matched = np.concatenate([e["dtMatches"][:, :max_det] for _, e in per_image], axis=1)[:, order]
        ignored = np.concatenate([e["dtIgnore"][:, :max_det] for _, e in per_image], axis=1)[:, order]
        gt = np.zeros(n_img, dtype=np.int64)
        for i, e in per_image:
            gt[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        return image[order], matched.astype(bool), ignored.astype(bool), gt

    def precision(self, cat_id, weights):
        """Interpolated precision [T, R] of category ``cat_id`` with image multiplicities
        ``weights`` [I], or None where COCOeval leaves it -1 (no non-ignored ground truth)."""
        entry = self.cats.get(cat_id)
        if entry is None:
            return None
        image, matched, ignored, gt = entry
        npig = float(np.dot(weights, gt))
        if npig == 0:
            return None
        w = np.asarray(weights, dtype=float)[image]
        tp = np.cumsum((matched & ~ignored) * w, axis=1)
        fp = np.cumsum((~matched & ~ignored) * w, axis=1)
        rc, pr = tp / npig, tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # the precision envelope
        q = np.zeros((self.num_iou, len(self.recall_thresholds)))
        for t in range(self.num_iou):
            idx = np.searchsorted(rc[t], self.recall_thresholds, side="left")
            # accumulate() fills thresholds up to the first unreachable one and leaves the rest 0
            reach = np.cumprod(idx < len(pr[t])).astype(bool)
            q[t, reach] = pr[t][idx[reach]]
        return q


def weighted_ap(table, cat_ids, weights=None):
    """COCO AP@[.5:.95] over the categories ``cat_ids`` (None: all) of ``table`` with image
    multiplicities ``weights`` [I] (default all 1); None when no category has ground truth."""
    weights = np.ones(len(table.image_ids)) if weights is None else np.asarray(weights, dtype=float)
    if weights.shape != (len(table.image_ids),):
        raise ValueError(f"weights: expected shape [{len(table.image_ids)}] (one per image), got {weights.shape}")
    cat_ids = list(table.cats) if cat_ids is None else list(cat_ids)
    unknown = [c for c in cat_ids if c not in table.cats]
    if unknown:
        raise ValueError(f"cat_ids: {unknown} were not evaluated (evaluated: {sorted(table.cats)})")
    return mean_precision([table.precision(c, weights) for c in cat_ids])


def mean_precision(per_category):
    """AP from the categories' precisions [T, R] (None: undefined, left out, as COCO's -1), or None."""
    defined = [q for q in per_category if q is not None]
    if not defined:
        return None
    # summarize(): np.mean(s[s > -1]) of precision[T, R, K]; the same values in the same order
    return float(np.mean(np.stack(defined, axis=-1).ravel()))


def bootstrap_weights(num_images, resamples, seed=0):
    """Image multiplicities [resamples, num_images] of resampling images with replacement."""
    if num_images < 1 or resamples < 1:
        raise ValueError(f"num_images and resamples: expected >= 1, got {num_images}, {resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=resamples)


def bootstrap_ap(table, cat_ids, weights):
    """AP of each resample, [resamples] (NaN where undefined), weights from ``bootstrap_weights``."""
    values = [weighted_ap(table, cat_ids, w) for w in weights]
    return np.array([np.nan if v is None else v for v in values])


def paired_interval(samples_a, samples_b, point_a, point_b, level=0.95):
    """Percentile bootstrap interval of a - b from the two arms' AP on the same resamples.
    Returns {"diff": point_a - point_b, "low", "high", "holds": the interval excludes 0}."""
    d = np.asarray(samples_a, dtype=float) - np.asarray(samples_b, dtype=float)
    if d.shape != np.shape(samples_b) or d.ndim != 1:
        raise ValueError(f"samples: expected two [resamples] arrays of one length, got {np.shape(samples_a)} "
                         f"and {np.shape(samples_b)}")
    d = d[np.isfinite(d)]
    if point_a is None or point_b is None or not len(d):
        return {"diff": None, "low": None, "high": None, "holds": False}
    low, high = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return _interval(point_a - point_b, low, high)


def _interval(point, low, high):
    return {"diff": float(point), "low": float(low), "high": float(high), "holds": bool(low > 0 or high < 0)}


def seed_interval(values, image_samples=None, level=0.95, image_std=None):
    """Mean over seeds and its Student-t interval, {"diff" (the mean), "low", "high", "holds",
    "n", "std"}; undefined values (None, NaN) are left out; n = 1 gives a zero-width interval
    and n = 0 Nones.

    ``image_samples`` [resamples] (optional): the seed-mean difference on each bootstrap resample
    of the val images (the same resamples for every seed). The seeds share one val set, so their
    spread holds no val-image sampling noise; that noise is added as the bootstrap variance of
    the seed mean: var = std^2 / n + var(image_samples) ("std_images" is the latter's square
    root), with Welch-Satterthwaite degrees of freedom (n - 1) * (var / (std^2 / n))^2 (the
    bootstrap variance, from many resamples, counts as known). Without it the interval treats
    the val set as fixed. ``image_std`` (instead of ``image_samples``): that noise's standard
    deviation itself, e.g. combined from two studies that did not keep their resamples.
    """
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return {"diff": None, "low": None, "high": None, "holds": False, "n": 0, "std": None}
    mean = float(v.mean())
    if len(v) == 1:
        return {**_interval(mean, mean, mean), "holds": False, "n": 1, "std": 0.0}
    std = float(v.std(ddof=1))
    seeds_var = var = std ** 2 / len(v)
    extra = {}
    if image_samples is not None and image_std is not None:
        raise ValueError("seed_interval: give image_samples or image_std, not both")
    if image_samples is not None:
        d = np.asarray(image_samples, dtype=float)
        d = d[np.isfinite(d)]
        if len(d) < 2:
            raise ValueError(f"image_samples: expected >= 2 finite resamples, got {len(d)}")
        image_std = float(d.std(ddof=1))
    if image_std is not None:
        if not (math.isfinite(image_std) and image_std >= 0):
            raise ValueError(f"image_std: expected a finite standard deviation >= 0, got {image_std}")
        extra["std_images"] = float(image_std)
        var += extra["std_images"] ** 2
    df = (len(v) - 1) * (var / seeds_var) ** 2 if seeds_var > 0 else math.inf
    half = float(student_t.ppf((1 + level) / 2, df)) * math.sqrt(var)
    return {**_interval(mean, mean - half, mean + half), "n": len(v), "std": std, **extra}


def _centered_ranks(x):
    """Average ranks of ``x`` [n], centred and scaled to unit norm (Spearman's rho of two such
    vectors is their dot product)."""
    r = rankdata(x)
    return (r - r.mean()) / np.linalg.norm(r - r.mean())


def pooled_permutation_pvalue(pairs, permutations=10000, seed=0):
    """Two-sided p-value of the mean Spearman's rho over several (x, y) samples (one per seed),
    under random pairing within every sample independently: the share of draws whose mean rho
    is at least as far from 0 as the observed one ((1 + hits) / (1 + permutations), the observed
    pairing counted). With few groups per seed (4 supercategories: p >= 2/24 per seed) this is
    the test that can still reject over seeds. Samples with an undefined rho are left out.
    Returns (mean rho, p), or (None, None) when no sample has a defined rho."""
    ranks = []
    for x, y in pairs:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"pairs: expected (x, y) 1-D arrays of one length, got {x.shape} and {y.shape}")
        if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            ranks.append((_centered_ranks(x), _centered_ranks(y)))
    if not ranks:
        return None, None
    observed = float(np.mean([rx @ ry for rx, ry in ranks]))
    rng = np.random.default_rng(seed)
    draws = np.zeros(permutations)
    for rx, ry in ranks:
        perms = np.argsort(rng.random((permutations, len(rx))), axis=1)
        draws += ry[perms] @ rx
    draws /= len(ranks)
    hits = int(np.count_nonzero(np.abs(draws) >= abs(observed) - 1e-12))
    return observed, (1 + hits) / (1 + permutations)


def permutation_pvalue(x, y, permutations=10000, seed=0):
    """Two-sided p-value of Spearman's rho(x, y) under random pairing: the share of pairings
    with |rho| >= the observed |rho|; every pairing when n! <= ``permutations`` (exact), else
    ``permutations`` random ones (the observed one counted, (1 + hits) / (1 + permutations)).
    Returns (rho, p); (None, None) when rho is undefined (fewer than 3 pairs, a constant side)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x, y: expected two 1-D arrays of one length, got {x.shape} and {y.shape}")
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    rx, ry = _centered_ranks(x), _centered_ranks(y)
    rho = float(rx @ ry)
    if math.factorial(len(x)) <= permutations:
        perms = np.array(list(itertools.permutations(range(len(x)))))
        exact = True
    else:
        perms, exact = np.argsort(np.random.default_rng(seed).random((permutations, len(x))), axis=1), False
    # rounding: a pairing with the same |rho| must count as "as extreme"
    hits = int(np.count_nonzero(np.abs(ry[perms] @ rx) >= abs(rho) - 1e-12))
    return rho, hits / len(perms) if exact else (1 + hits) / (1 + permutations)
