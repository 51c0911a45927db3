"""COCO evaluation: overall / per-category / critical AP, transformed predictions, reports."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from fqdetr.cli import main as cli_main
from fqdetr.data import builtin_paths, load_coco, make_builtin_dataset
from fqdetr.evaluation import (critical_queries, evaluate_critical_transformed, evaluate_detections,
                               resolve_critical_sets, transform_probs, transformed_detections,
                               write_report)


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt")
    make_builtin_dataset(root, num_train=0, num_val=40, image_size=128, seed=5)
    return builtin_paths(root, "val")[1]


@pytest.fixture(scope="module")
def coco_gt(gt_file):
    return load_coco(gt_file)


def perfect(coco_gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": 1.0} for a in coco_gt.dataset["annotations"]]


def noisy(coco_gt, seed=0):
    """Fixed imperfect detections: jittered, some missed, some wrong-class, false positives."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(coco_gt.cats)
    dets = []
    for a in coco_gt.dataset["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        jit = rng.normal(0, 0.1, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() < 0.85 else int(rng.choice(cat_ids))
        dets.append({"image_id": a["image_id"], "category_id": cat,
                     "bbox": [x + jit[0], y + jit[1], max(1, w + jit[2]), max(1, h + jit[3])],
                     "score": float(rng.random())})
    for img_id in list(coco_gt.imgs)[:20]:
        dets.append({"image_id": img_id, "category_id": int(rng.choice(cat_ids)),
                     "bbox": [5.0, 5.0, 20.0, 20.0], "score": float(rng.random() * 0.5)})
    return dets


def reference_stats(coco_gt, dets, cat_ids=None):
    """COCOeval run directly, as a user would, independent of fqdetr's code path."""
    with contextlib.redirect_stdout(io.StringIO()):
        E = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in dets]), "bbox")
        if cat_ids is not None:
            E.params.catIds = cat_ids
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E.stats


def test_perfect_detections_score_one(coco_gt):
    r = evaluate_detections(coco_gt, perfect(coco_gt))
    assert r["overall"]["AP"] == pytest.approx(1.0) and r["overall"]["AP50"] == pytest.approx(1.0)
    assert set(r["critical"]) == {"person", "vehicle", "animal", "sign"}  # default: supercategories
    assert all(c["AP"] == pytest.approx(1.0) for c in r["critical"].values())
    for c in r["per_category"].values():
        assert c["AP"] == (pytest.approx(1.0) if c["num_gt"] else None)


def test_shifted_and_shuffled_detections_score_less(coco_gt):
    shifted = [dict(d, bbox=[d["bbox"][0] + 0.3 * d["bbox"][2]] + d["bbox"][1:]) for d in perfect(coco_gt)]
    r = evaluate_detections(coco_gt, shifted)
    assert 0.0 < r["overall"]["AP"] < 0.9 and r["overall"]["AP50"] == pytest.approx(1.0)
    cat_ids = sorted(coco_gt.cats)
    rng = np.random.default_rng(0)
    shuffled = [dict(d, category_id=int(rng.choice(cat_ids))) for d in perfect(coco_gt)]
    assert evaluate_detections(coco_gt, shuffled)["overall"]["AP"] < 0.5


def test_matches_cocoeval_restricted(coco_gt):
    dets = noisy(coco_gt)
    r = evaluate_detections(coco_gt, dets, critical_sets=["person", "vehicle+sign", "cat", 21])
    assert r["overall"]["AP"] == pytest.approx(reference_stats(coco_gt, dets)[0], abs=1e-12)
    sets = {"person": [1, 2, 3, 4], "vehicle+sign": [11, 12, 13, 14, 31, 32, 33, 34],
            "cat": [22], "21": [21]}
    assert {k: v["cat_ids"] for k, v in r["critical"].items()} == sets
    for name, ids in sets.items():
        stats = reference_stats(coco_gt, dets, ids)
        assert r["critical"][name]["AP"] == pytest.approx(stats[0], abs=1e-12)
        assert r["critical"][name]["AP50"] == pytest.approx(stats[1], abs=1e-12)
    assert 0.1 < r["critical"]["person"]["AP"] < 0.95
    for name, c in r["per_category"].items():  # per-category AP from the precision array
        if c["num_gt"]:
            assert c["AP"] == pytest.approx(reference_stats(coco_gt, dets, [c["id"]])[0], abs=1e-12)


def test_empty_detections(coco_gt, gt_file):
    r = evaluate_detections(gt_file, [])
    assert r["overall"]["AP"] == 0.0 and r["num_detections"] == 0
    assert all(c["AP"] == 0.0 for c in r["critical"].values())


def test_gt_without_iscrowd_and_area(coco_gt):
    data = json.loads(json.dumps(coco_gt.dataset))
    for a in data["annotations"]:
        del a["iscrowd"], a["area"]
    r = evaluate_detections(data, perfect(coco_gt))
    assert r["overall"]["AP"] == pytest.approx(1.0)
    assert "iscrowd" not in data["annotations"][0]  # the caller's dict is not modified


def test_bad_detections_raise(coco_gt, tmp_path):
    good = perfect(coco_gt)[0]
    with pytest.raises(ValueError, match="image_id 999999 is not in the ground truth"):
        evaluate_detections(coco_gt, [dict(good, image_id=999999)])
    with pytest.raises(ValueError, match="category_id 77"):
        evaluate_detections(coco_gt, [dict(good, category_id=77)])
    with pytest.raises(ValueError, match="must have image_id, category_id, bbox, score"):
        evaluate_detections(coco_gt, [{"image_id": good["image_id"]}])
    with pytest.raises(ValueError, match="bbox"):
        evaluate_detections(coco_gt, [dict(good, bbox=[1, 2, 3])])
    (tmp_path / "d.json").write_text("[{")
    with pytest.raises(ValueError, match="d.json: invalid JSON"):
        evaluate_detections(coco_gt, str(tmp_path / "d.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_detections(coco_gt, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="neither a supercategory"):
        resolve_critical_sets(coco_gt, ["robots"])


def test_transform_probs_lse_and_max():
    probs = np.array([[0.40, 0.30, 0.20, 0.05, 0.05],    # S={0}: 0.40 < other 0.55 -> not S
                      [0.05, 0.60, 0.10, 0.05, 0.20],    # S={0,1}: 0.60 > 0.15 -> label 1
                      [0.05, 0.10, 0.05, 0.10, 0.70],    # other beats S: dropped
                      [0.00, 0.00, 0.00, 0.00, 1.00]])   # tie at 0 goes to other
    t = transform_probs(probs, [0])
    assert t.shape == (4, 3) and np.allclose(t.sum(1), 1.0)  # lse: exact marginal
    assert np.allclose(t[0], [0.40, 0.55, 0.05])
    keep, labels, scores = critical_queries(probs, [0])
    assert keep.tolist() == [False, False, False, False]
    keep, _, _ = critical_queries(probs, [0], other="max")  # 0.40 beats max(0.30, 0.20, 0.05)
    assert keep.tolist() == [True, False, False, False]
    keep, labels, scores = critical_queries(probs, [0, 1])  # row 0: 0.40 beats other 0.25
    assert keep.tolist() == [True, True, False, False] and labels[:2].tolist() == [0, 1]
    assert scores[:2] == pytest.approx([0.40, 0.60])
    with pytest.raises(ValueError, match="critical labels"):
        transform_probs(probs, [4])


def _raw_predictions(coco_gt, rng):
    """Per image: one query per gt box (true class gets p_true, the rest spread over the
    other classes) plus a no-object query; boxes xyxy in pixels."""
    cat_ids = sorted(coco_gt.cats)
    preds = []
    for img_id in sorted(coco_gt.imgs):
        anns = coco_gt.imgToAnns.get(img_id, [])
        probs = np.full((len(anns) + 1, len(cat_ids) + 1), 0.0)
        boxes = np.zeros((len(anns) + 1, 4))
        for q, a in enumerate(anns):
            p_true = rng.uniform(0.2, 0.9)
            probs[q, :-1] = (1 - p_true) / (len(cat_ids) - 1)
            probs[q, cat_ids.index(a["category_id"])] = p_true
            x, y, w, h = a["bbox"]
            boxes[q] = [x, y, x + w, y + h]
        probs[-1, -1] = 1.0
        preds.append({"image_id": img_id, "probs": probs, "boxes": boxes})
    return preds


def test_critical_ap_on_transformed_predictions(coco_gt):
    preds = _raw_predictions(coco_gt, np.random.default_rng(1))
    labels = [sorted(coco_gt.cats).index(c) for c in (1, 2, 3, 4)]
    out = evaluate_critical_transformed(coco_gt, preds, ["person"])
    dets = transformed_detections(preds, labels, sorted(coco_gt.cats))
    # with 16 classes and p_true >= 0.2 the true class beats the other 15 individually,
    # but "other" (sum over the 12 non-person classes) wins when p_true < 12/15 * (1 - p_true) ...
    assert 0 < out["person"]["num_detections"] == len(dets)
    n_person = len(coco_gt.getAnnIds(catIds=[1, 2, 3, 4]))
    assert len(dets) < n_person  # ... so low-confidence person queries are no longer detections
    assert out["person"]["AP"] == pytest.approx(reference_stats(coco_gt, dets, [1, 2, 3, 4])[0], abs=1e-12)
    assert out["person"]["AP"] < 1.0
    # plain argmax detections (DETR postprocess) keep every person query: AP 1
    plain = evaluate_detections(coco_gt, perfect(coco_gt), ["person"], transformed_predictions=preds)
    assert plain["critical"]["person"]["AP"] == pytest.approx(1.0)
    assert plain["critical_transformed"]["person"]["AP"] == pytest.approx(out["person"]["AP"])


def _no_tmp_left(folder):
    return not [f for f in os.listdir(folder) if f.startswith(".tmp")]


def test_write_report(coco_gt, tmp_path):
    preds = _raw_predictions(coco_gt, np.random.default_rng(2))
    r = evaluate_detections(coco_gt, noisy(coco_gt), ["person", "animal+sign"], transformed_predictions=preds)
    paths = write_report(r, tmp_path / "rep")
    assert json.load(open(paths["json"])) == json.loads(json.dumps(r))
    md = open(paths["markdown"]).read()
    assert "## Overall" in md and "## Critical sets" in md and "AP (T_S)" in md
    for name in ("person", "animal+sign", "adult", "stop"):
        assert f"| {name} |" in md
    assert f"{100 * r['overall']['AP']:.1f}" in md
    assert {os.path.basename(p) for p in paths["plots"]} == {
        "ap_per_category.png", "ap_person.png", "ap_vehicle.png", "ap_animal.png", "ap_sign.png"}
    for p in paths["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert _no_tmp_left(tmp_path / "rep")


def test_cli_eval(gt_file, coco_gt, tmp_path, capsys):
    det = tmp_path / "det.json"
    det.write_text(json.dumps(noisy(coco_gt)))
    out = tmp_path / "out"
    assert cli_main(["eval", "--gt", str(gt_file), "--detections", str(det),
                     "--critical", "person,vehicle", "--out", str(out), "--no-plots"]) == 0
    report = json.load(open(out / "report.json"))
    assert set(report["critical"]) == {"person", "vehicle"}
    assert cli_main(["eval", "--gt", str(gt_file), "--detections", str(det)]) == 0
    assert "| sign |" in capsys.readouterr().out


# --------------------------------------------------------- a model's labels on another numbering

def _renumber(root, new_id, drop=()):
    """Rewrites both splits' jsons under ``root``: category id c becomes new_id[c]; categories
    named in ``drop`` go, with their boxes."""
    for split in ("train", "val"):
        ann = builtin_paths(root, split)[1]
        data = json.loads(open(ann).read())
        kept = {c["id"] for c in data["categories"] if c["name"] not in drop}
        data["categories"] = [dict(c, id=new_id[c["id"]]) for c in data["categories"] if c["id"] in kept]
        data["annotations"] = [dict(a, category_id=new_id[a["category_id"]]) for a in data["annotations"]
                               if a["category_id"] in kept]
        with open(ann, "w") as f:
            json.dump(data, f)


@pytest.fixture(scope="module")
def shipped():
    """(model, its class names, image size, canvas) of the shipped DETR."""
    from fqdetr.cli._common import DEFAULT_MODEL
    from fqdetr.data import class_names_of
    from fqdetr.engine.setup import checkpoint_geometry
    from fqdetr.models import load_detr_checkpoint
    from fqdetr.models.checkpoint import read_checkpoint

    return (load_detr_checkpoint(DEFAULT_MODEL).eval(), class_names_of(read_checkpoint(DEFAULT_MODEL)),
            *checkpoint_geometry(DEFAULT_MODEL))


def test_labels_follow_the_checkpoint_not_the_dataset_numbering(shipped, tmp_path):
    import shutil

    from fqdetr.engine.evaluate import evaluate_model
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.setup import load_datasets

    model, names, image_size, canvas = shipped
    make_builtin_dataset(tmp_path / "a", num_train=0, num_val=8, seed=1)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ids = sorted(c["id"] for c in load_coco(builtin_paths(tmp_path / "a", "val")[1]).dataset["categories"])
    _renumber(tmp_path / "b", dict(zip(ids, reversed(ids))))  # same categories, ids in reverse order

    def evaluate(root, class_names):
        val = load_datasets(root, image_size, class_names=class_names)["val"]
        return evaluate_model(model, make_loader(val, 8, canvas, shuffle=False))["result"]

    original, renumbered = evaluate(tmp_path / "a", names), evaluate(tmp_path / "b", names)
    assert original["overall"]["AP"] > 0.2
    assert renumbered["overall"]["AP"] == pytest.approx(original["overall"]["AP"], abs=1e-12)
    assert {n: c["AP"] for n, c in renumbered["per_category"].items()} == \
        {n: c["AP"] for n, c in original["per_category"].items()}
    # Labels by the dataset's own sorted ids (what evaluation did before) score far less.
    assert evaluate(tmp_path / "b", None)["overall"]["AP"] < 0.5 * original["overall"]["AP"]


def test_dataset_categories_must_match_the_checkpoint(shipped, tmp_path, capsys):
    from fqdetr.engine.setup import load_datasets

    _, names, image_size, _ = shipped
    make_builtin_dataset(tmp_path, num_train=0, num_val=2, seed=1)
    ids = {c["id"]: c["id"] for c in load_coco(builtin_paths(tmp_path, "val")[1]).dataset["categories"]}
    _renumber(tmp_path, ids, drop=("cat",))
    with pytest.raises(ValueError, match=r"instances_train.json: its categories disagree with the model's 16 "
                                         r"classes: missing \['cat'\], not in the model \[\]"):
        load_datasets(tmp_path, image_size, class_names=names)
    assert cli_main(["ptq", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "missing ['cat']" in capsys.readouterr().err
