"""fqdetr.stats: weighted COCO accumulation, paired bootstrap, seed intervals, permutation p-value."""
import numpy as np
import pytest
from scipy.stats import t as student_t

from fqdetr.data import builtin_paths, load_coco, make_builtin_dataset
from fqdetr.evaluation.cocoeval import evaluate_images, load_detections, run_cocoeval
from fqdetr.stats import (MatchTable, bootstrap_ap, bootstrap_weights, paired_interval, permutation_pvalue,
                          pooled_permutation_pvalue, seed_interval, weighted_ap)


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt")
    make_builtin_dataset(root, num_train=0, num_val=30, image_size=128, seed=3)
    return load_coco(builtin_paths(root, "val")[1])


def noisy(coco_gt, seed=0):
    """Jittered, partly missed, partly wrong-class detections plus false positives; distinct scores."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(coco_gt.cats)
    dets = []
    for a in coco_gt.dataset["annotations"]:
        if rng.random() < 0.2:
            continue
        x, y, w, h = a["bbox"]
        jit = rng.normal(0, 0.15, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() < 0.8 else int(rng.choice(cat_ids))
        dets.append({"image_id": a["image_id"], "category_id": cat,
                     "bbox": [x + jit[0], y + jit[1], max(1, w + jit[2]), max(1, h + jit[3])]})
    for img_id in coco_gt.imgs:
        dets.append({"image_id": img_id, "category_id": int(rng.choice(cat_ids)), "bbox": [5.0, 5.0, 30.0, 25.0]})
    for d, s in zip(dets, rng.permutation(len(dets))):
        d["score"] = float(s + 1) / (len(dets) + 1)
    return dets


def supercategory_ids(coco_gt):
    sup = sorted({c["supercategory"] for c in coco_gt.cats.values()})[0]
    return [c for c, cat in coco_gt.cats.items() if cat["supercategory"] == sup]


def test_unit_weights_give_cocoeval_ap_exactly(coco_gt):
    dets = noisy(coco_gt)
    table = MatchTable(evaluate_images(coco_gt, load_detections(dets, coco_gt)))
    expected = run_cocoeval(coco_gt, load_detections(dets, coco_gt)).stats[0]
    assert 0.05 < expected < 0.95
    assert weighted_ap(table, None) == expected  # bit for bit
    ids = supercategory_ids(coco_gt)
    assert weighted_ap(table, ids) == run_cocoeval(coco_gt, load_detections(dets, coco_gt), cat_ids=ids).stats[0]


def test_unit_weights_on_the_shipped_model(tmp_path):
    """A real detector's detections (ties in scores, one per query) on the first 12 val images of
    the dataset it was trained on (val images depend only on the generator's seed and index)."""
    from fqdetr.cli._common import DEFAULT_MODEL
    from fqdetr.data import class_names_of
    from fqdetr.engine.evaluate import evaluate_model
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.setup import checkpoint_geometry, load_datasets
    from fqdetr.models import load_detr_checkpoint
    from fqdetr.models.checkpoint import read_checkpoint
    import torch

    image_size, canvas = checkpoint_geometry(DEFAULT_MODEL)
    make_builtin_dataset(tmp_path, num_train=0, num_val=12, image_size=128, seed=0)
    data = load_datasets(tmp_path, image_size, 0, 12, class_names=class_names_of(
        read_checkpoint(DEFAULT_MODEL)))
    loader = make_loader(torch.utils.data.Subset(data["val"], range(12)), 4, canvas, shuffle=False)
    dets = evaluate_model(load_detr_checkpoint(DEFAULT_MODEL).eval(), loader)["detections"]
    ids = {d["image_id"] for d in dets}
    full = data["val"].coco.dataset
    gt = load_coco({"images": [i for i in full["images"] if i["id"] in ids], "categories": full["categories"],
                    "annotations": [a for a in full["annotations"] if a["image_id"] in ids]})
    expected = run_cocoeval(gt, load_detections(dets, gt)).stats[0]
    assert weighted_ap(MatchTable(evaluate_images(gt, load_detections(dets, gt))), None) == expected > 0.1


def duplicated(coco_gt, dets, weights):
    """gt and detections with image i present weights[i] times (new ids): what a resample means."""
    images, anns, out = [], [], []
    for i, (img_id, w) in enumerate(zip(sorted(coco_gt.imgs), weights)):
        for copy in range(w):
            new = 10000 * (copy + 1) + img_id
            images.append({**coco_gt.imgs[img_id], "id": new})
            anns += [{**a, "image_id": new, "id": len(anns) + 1 + j}
                     for j, a in enumerate(coco_gt.imgToAnns[img_id])]
            out += [{**d, "image_id": new} for d in dets if d["image_id"] == img_id]
    gt = load_coco({"images": images, "annotations": anns, "categories": list(coco_gt.dataset["categories"])})
    return gt, out


def test_weights_equal_cocoeval_on_a_duplicated_dataset(coco_gt):
    dets = noisy(coco_gt, seed=1)
    table = MatchTable(evaluate_images(coco_gt, load_detections(dets, coco_gt)))
    for w in bootstrap_weights(len(coco_gt.imgs), 3, seed=7):
        gt, dup = duplicated(coco_gt, dets, w)
        assert weighted_ap(table, None, w) == pytest.approx(run_cocoeval(gt, load_detections(dup, gt)).stats[0],
                                                            abs=1e-12)


def three_images():
    """One category, three 100x100 images: A has a gt found at score .9, B a gt missed and a false
    positive at .8, C no gt and a false positive at .7."""
    box, elsewhere = [10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 30.0, 30.0]
    gt = load_coco({"images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100}
                               for i in (1, 2, 3)],
                    "annotations": [{"id": k, "image_id": k, "category_id": 1, "bbox": box, "area": 1600,
                                     "iscrowd": 0} for k in (1, 2)],
                    "categories": [{"id": 1, "name": "a", "supercategory": "s"}]})
    dets = [{"image_id": 1, "category_id": 1, "bbox": box, "score": 0.9},
            {"image_id": 2, "category_id": 1, "bbox": elsewhere, "score": 0.8},
            {"image_id": 3, "category_id": 1, "bbox": elsewhere, "score": 0.7}]
    return gt, dets


def test_weighted_ap_by_hand():
    gt, dets = three_images()
    table = MatchTable(evaluate_images(gt, load_detections(dets, gt)))
    # all once: recall 1/2 at precision 1, then only false positives: 51 of 101 recall thresholds
    assert weighted_ap(table, [1], [1, 1, 1]) == pytest.approx(51 / 101, abs=1e-15)
    assert weighted_ap(table, [1], [2, 0, 1]) == 1.0  # both gts found before any false positive
    assert weighted_ap(table, [1], [0, 1, 1]) == 0.0  # one gt, never found
    assert weighted_ap(table, [1], [0, 0, 3]) is None  # no gt: undefined, as COCOeval's -1
    with pytest.raises(ValueError, match="weights"):
        weighted_ap(table, [1], [1, 1])
    with pytest.raises(ValueError, match="cat_ids"):
        weighted_ap(table, [2])


def test_paired_bootstrap_by_hand():
    gt, dets = three_images()
    better = [dict(d, bbox=[10.0, 10.0, 40.0, 40.0]) if d["image_id"] == 2 else d for d in dets]  # finds B's gt
    tables = [MatchTable(evaluate_images(gt, load_detections(d, gt))) for d in (better, dets)]
    weights = np.array([[1, 1, 1], [0, 1, 2], [2, 0, 1], [3, 0, 0], [0, 2, 1]])
    a, b = (bootstrap_ap(t, [1], weights) for t in tables)
    # better: every gt found first, AP 1 wherever a gt exists; dets: as test_weighted_ap_by_hand
    np.testing.assert_allclose(a, [1, 1, 1, 1, 1])
    np.testing.assert_allclose(b, [51 / 101, 0, 1, 1, 0])
    r = paired_interval(a, b, 1.0, 51 / 101)
    d = np.sort(1 - np.array([51 / 101, 0, 1, 1, 0]))
    assert r["diff"] == pytest.approx(50 / 101)
    assert r["low"] == pytest.approx(np.quantile(d, 0.025)) and r["high"] == pytest.approx(np.quantile(d, 0.975))
    assert r["low"] == 0.0 and not r["holds"]  # two resamples show no difference: not excluded


def test_bootstrap_weights_resample_every_image_count():
    w = bootstrap_weights(7, 200, seed=3)
    assert w.shape == (200, 7) and (w.sum(1) == 7).all() and (w >= 0).all()
    assert (w == 0).any() and (w > 1).any()
    np.testing.assert_array_equal(w, bootstrap_weights(7, 200, seed=3))
    with pytest.raises(ValueError, match="num_images"):
        bootstrap_weights(0, 5)


def test_seed_interval_is_a_t_interval():
    r = seed_interval([1.0, 2.0, 3.0, None])
    half = 4.302652729911275 / np.sqrt(3)  # t(0.975, 2 df) * std 1 / sqrt(3)
    assert r["n"] == 3 and r["diff"] == 2.0
    assert r["low"] == pytest.approx(2 - half) and r["high"] == pytest.approx(2 + half) and not r["holds"]
    assert seed_interval([0.5, 0.6, 0.55])["holds"]
    assert seed_interval([])["diff"] is None


def test_seed_interval_adds_the_val_images_variance_by_hand():
    # seeds 1, 2, 3: std 1; image resamples of the seed mean 1.5, 2.5 (std sqrt(0.5));
    # var = 1/3 + 1/2, Satterthwaite df = 2 * (var / (1/3))^2 = 12.5
    r = seed_interval([1.0, 2.0, 3.0], image_samples=[1.5, 2.5, np.nan])
    half = student_t.ppf(0.975, 12.5) * np.sqrt(1 / 3 + 0.5)
    assert r["std_images"] == pytest.approx(np.sqrt(0.5))
    assert r["low"] == pytest.approx(2 - half) and r["high"] == pytest.approx(2 + half)
    # equal seeds no longer give a zero-width interval when the val images vary (df infinite)
    r = seed_interval([0.2, 0.2, 0.2], image_samples=[0.0, 0.4])
    assert r["high"] - 0.2 == pytest.approx(1.959963984540054 * np.sqrt(0.08))
    assert r["low"] < 0 < r["high"] and not r["holds"]
    with pytest.raises(ValueError, match="image_samples"):
        seed_interval([1.0, 2.0], image_samples=[np.nan, 1.0])


def test_pooled_permutation_pvalue_by_hand():
    # two seeds, 4 groups each, both perfectly ranked: |mean rho| >= 1 only when both draws give
    # rho = 1 or both -1, so p = 2 / 24^2 = 1/288; Monte Carlo with 40000 draws: sd ~ 0.0003
    up = ([1, 2, 3, 4], [10, 20, 30, 40])
    rho, p = pooled_permutation_pvalue([up, up], permutations=40000)
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / 288, abs=0.0012)
    # seeds that disagree cancel: mean rho 0, p 1
    rho, p = pooled_permutation_pvalue([up, ([1, 2, 3, 4], [40, 30, 20, 10])], permutations=2000)
    assert rho == pytest.approx(0.0) and p == 1.0
    # one seed: the Monte Carlo estimate of that seed's exact p (8/24, rho 0.8)
    rho, p = pooled_permutation_pvalue([([1, 2, 3, 4], [1, 3, 2, 4])], permutations=40000)
    assert rho == pytest.approx(0.8) and p == pytest.approx(8 / 24, abs=0.01)
    # undefined rhos are left out
    assert pooled_permutation_pvalue([([1, 2, 3], [5, 5, 5])]) == (None, None)
    with pytest.raises(ValueError, match="pairs"):
        pooled_permutation_pvalue([([1, 2, 3], [1, 2])])


def test_permutation_pvalue_by_hand():
    # n = 4: the sum of squared rank differences over all 24 pairings is 0 (1), 2 (3), 4-16 (16), 18 (3), 20 (1)
    rho, p = permutation_pvalue([1, 2, 3, 4], [10, 20, 30, 40])
    assert rho == pytest.approx(1.0) and p == pytest.approx(2 / 24)
    rho, p = permutation_pvalue([1, 2, 3, 4], [1, 3, 2, 4])
    assert rho == pytest.approx(0.8) and p == pytest.approx(8 / 24)
    assert permutation_pvalue([1, 2, 3], [5, 5, 5]) == (None, None)
    x = np.arange(12.0)
    rho, p = permutation_pvalue(x, x ** 2, permutations=2000)  # 12! pairings: Monte Carlo
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / 2001)
    _, p = permutation_pvalue(x, np.random.default_rng(0).permutation(12), permutations=2000)
    assert p > 0.05


def test_seed_interval_takes_a_known_image_std():
    by_samples = seed_interval([1.0, 2.0, 3.0], image_samples=[1.5, 2.5])
    by_std = seed_interval([1.0, 2.0, 3.0], image_std=np.sqrt(0.5))
    assert by_std == pytest.approx(by_samples)
    with pytest.raises(ValueError, match="not both"):
        seed_interval([1.0, 2.0], image_samples=[1.0, 2.0], image_std=0.1)
    with pytest.raises(ValueError, match="image_std"):
        seed_interval([1.0, 2.0], image_std=float("nan"))
