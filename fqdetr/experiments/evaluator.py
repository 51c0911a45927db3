"""One evaluation per arm of the study, with the paired bootstrap's per-resample APs
(fqdetr.stats; docs/METHOD.md section 6).

COCOeval.evaluate() runs once per arm and split; every AP (overall, each critical set, each
category) and every resample's AP comes from its per-image matches. Critical AP on the
T_S-transformed predictions (docs/METHOD.md section 1.5) is one more COCOeval of the critical
set's transformed detections (a point value, no bootstrap).
"""

import torch

from fqdetr.engine.evaluate import coco_dataset_of, predict, to_coco_results
from fqdetr.engine.family import family_of
from fqdetr.engine.loader import make_loader
from fqdetr.evaluation.cocoeval import evaluate_images, load_detections, resolve_critical_sets
from fqdetr.evaluation.transformed import evaluate_critical_transformed
from fqdetr.data.coco import load_coco
from fqdetr.experiments.stopwatch import Stopwatch
from fqdetr.stats import MatchTable, bootstrap_weights, mean_precision, weighted_ap


def restricted_gt(coco, image_ids):
    """A COCO of ``coco``'s ground truth on ``image_ids`` only (the images an arm is evaluated on)."""
    wanted = set(image_ids)
    d = coco.dataset
    return load_coco({"images": [i for i in d["images"] if i["id"] in wanted], "categories": list(d["categories"]),
                      "annotations": [a for a in d["annotations"] if a["image_id"] in wanted]})


class SplitEvaluator:
    """Evaluates models on the images ``indices`` of ``dataset`` (a CocoDetection), padded to
    ``canvas``. sets: {set name: member spec} as fqdetr.evaluation.resolve_critical_sets reads
    them; transformed: the set names whose critical AP on transformed predictions is reported;
    resamples: bootstrap resamples of these images (0: none), drawn with ``seed``."""

    def __init__(self, dataset, indices, canvas, sets, transformed=(), resamples=0, seed=0, batch_size=8,
                 watch=None):
        self.watch = watch or Stopwatch()
        self.dataset = coco_dataset_of(dataset)
        self.loader = make_loader(torch.utils.data.Subset(dataset, list(indices)), batch_size, canvas, shuffle=False)
        self.gt = restricted_gt(self.dataset.coco, [self.dataset.ids[i] for i in indices])
        self.sets = resolve_critical_sets(self.gt, sets)
        self.transformed = {name: sets[name] for name in transformed}
        self.categories = {c["name"]: c["id"] for c in self.gt.dataset["categories"]}
        self.weights = bootstrap_weights(len(self.gt.imgs), resamples, seed) if resamples else None

    def evaluate(self, model, bootstrap=True):
        """{"mAP", "critical": {set: AP}, "per_category": {name: AP}, "critical_transformed":
        {set: AP}, "bootstrap": {"mAP" / set name: [resamples] APs (None: undefined)}}."""
        with self.watch.stage("eval: detector"):
            preds, ids, probs, boxes = predict(model, self.loader, query_boxes=True)
        with self.watch.stage("eval: cocoeval"):
            dets = to_coco_results(preds, ids, self.dataset.label_to_cat_id)
            table = MatchTable(evaluate_images(self.gt, load_detections(dets, self.gt)))
        out = {"mAP": weighted_ap(table, None),
               "critical": {name: weighted_ap(table, ids_) for name, ids_ in self.sets.items()},
               "per_category": {name: weighted_ap(table, [c]) for name, c in self.categories.items()}}
        if self.transformed:  # its own COCOeval: counted with cocoeval
            raw = [{"image_id": i, "probs": p, "boxes": b} for i, p, b in zip(ids, probs, boxes)]
            t = evaluate_critical_transformed(self.gt, raw, self.transformed, self.dataset.label_to_cat_id,
                                              head=family_of(model).head)
            out["critical_transformed"] = {name: r["AP"] for name, r in t.items()}
        if bootstrap and self.weights is not None:
            with self.watch.stage("eval: bootstrap"):
                out["bootstrap"] = self._bootstrap(table)
        return out

    def _bootstrap(self, table):
        """Per-resample AP of "mAP" and each set; each category's precision computed once per
        resample and shared by every metric containing it."""
        metrics = {"mAP": list(table.cats), **self.sets}
        samples = {name: [] for name in metrics}
        for w in self.weights:
            prec = {c: table.precision(c, w) for c in table.cats}
            for name, cat_ids in metrics.items():
                ap = mean_precision([prec[c] for c in cat_ids])
                samples[name].append(ap)  # None: undefined on this resample
        return samples
