"""``fqdetr detect``: a model's detections on image files, drawn on the images and as a COCO
results json.

    fqdetr detect --model model.onnx photos/*.jpg --out DIR [--critical person] [--score-threshold 0.5]

--model is any kind fqdetr eval takes (float or quantized checkpoint, packed .fqp, .onnx),
run at the image size and canvas it records. Writes DIR/<stem>.png per image (boxes with
"name score" tags, critical classes in red: fqdetr.visualize.draw_detections) and
DIR/detections.json: COCO result dicts {image_id, category_id, bbox [x, y, w, h], score} of
the detections scoring at least --score-threshold. ``image_id`` is the file's stem when every
stem is a number (COCO file names such as 000000000139.jpg), else the image's position on the
command line, from 1; DIR/images.json maps each image_id to its file.
"""
import logging

log = logging.getLogger(__name__)


def add_parser(subparsers):
    from fqdetr.cli._common import DEFAULT_MODEL, positive_int

    p = subparsers.add_parser("detect", help="detections drawn on images, and a COCO results json")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="float or quantized checkpoint, packed .fqp or "
                                                               ".onnx (default: the shipped DETR)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures and detections.json")
    p.add_argument("--critical", default="person", help="classes drawn in the critical colour: a supercategory, "
                                                        "a category name, or names joined by '+' (default person)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="detections kept and drawn (default 0.5)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per batch (default 4)")
    p.set_defaults(func=run)


def image_ids(paths):
    """COCO image ids of ``paths``: their stems when all are distinct numbers, else 1..N."""
    from pathlib import Path

    stems = [Path(p).stem for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


class Images:
    """Decoded images as a dataset for make_loader: (image [3, H, W] resized and normalised,
    target {"image_id", "orig_size"})."""

    def __init__(self, images, ids, image_size):
        from fqdetr.data import make_transforms, max_size_for

        self.images, self.ids = images, ids
        self.transforms = make_transforms("val", scales=[image_size], max_size=max_size_for(image_size))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        import torch

        w, h = self.images[index].size
        size = torch.tensor([h, w])
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "orig_size": size,
                  "size": size, "image_id": torch.tensor(self.ids[index])}
        return self.transforms(self.images[index], target)


def _categories(metadata, model_path):
    """The model's COCO categories in label order (from the metadata its file carries)."""
    categories, order = metadata.get("categories"), metadata.get("label_to_cat_id")
    if not categories or not order:
        raise ValueError(f"--model: {model_path} records no categories (a checkpoint of fqdetr train, or a "
                         f"file made from one, does)")
    by_id = {c["id"]: c for c in categories}
    return [by_id[c] for c in order]


def run(args):
    from pathlib import Path

    from fqdetr.cli.eval import model_geometry
    from fqdetr.critical import category_sets
    from fqdetr.data.coco import load_image
    from fqdetr.engine.evaluate import predict, to_coco_results
    from fqdetr.engine.loader import make_loader
    from fqdetr.export import load_artifact
    from fqdetr.io import atomic_write, write_json
    from fqdetr.visualize import draw_detections

    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold: expected a value in [0, 1], got {args.score_threshold}")
    stems = [Path(p).stem for p in args.images]
    if len(set(stems)) != len(stems):
        raise ValueError(f"IMAGE: two files share a name ({sorted(s for s in stems if stems.count(s) > 1)[0]}); "
                         f"the pictures are named after the files")
    images = [load_image(path) for path in args.images]  # a bad file fails here, naming it, before any write
    artifact = load_artifact(args.model)
    categories = _categories(artifact.metadata, args.model)
    critical = next(iter(category_sets(categories, [args.critical.split("+")]).values()))
    image_size, canvas = model_geometry(None, artifact.metadata)
    ids = image_ids(args.images)
    loader = make_loader(Images(images, ids, image_size), args.batch_size, canvas, shuffle=False)
    preds, pred_ids, _ = predict(artifact.model, loader)
    names = [c["name"] for c in categories]
    for stem, image, pred in zip(stems, images, preds):
        picture = draw_detections(image, pred["boxes"], pred["labels"], pred["scores"], names,
                                  critical_labels=critical, score_threshold=args.score_threshold)
        atomic_write(Path(args.out) / f"{stem}.png", lambda f: picture.save(f, format="PNG"))
    detections = to_coco_results(preds, pred_ids, [c["id"] for c in categories], min_score=args.score_threshold)
    write_json({str(i): str(p) for i, p in zip(ids, args.images)}, Path(args.out) / "images.json")
    print(f"{len(detections)} detections on {len(ids)} images; wrote "
          f"{write_json(detections, Path(args.out) / 'detections.json')}")
    return 0
