"""COCO-format detection dataset (any COCO instances json + image folder).

Targets follow DETR's conventions (crowd boxes dropped, boxes clipped, empty boxes
removed, boxes cxcywh normalised by the transformed image size) except that labels
are contiguous class indices 0..C-1 rather than raw COCO ids, so the classifier has
exactly C + 1 outputs; the dataset keeps the mapping both ways.
"""
import contextlib
import io
import json
import logging
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

log = logging.getLogger(__name__)


def _check_list_of_dicts(data, key, where, required):
    if key not in data:
        raise ValueError(f"{where}: missing top-level key {key!r} (a COCO instances json "
                         f"needs 'images', 'annotations' and 'categories')")
    if not isinstance(data[key], list):
        raise ValueError(f"{where}: {key!r} must be a list, got {type(data[key]).__name__}")
    for i, item in enumerate(data[key]):
        missing = [k for k in required if not isinstance(item, dict) or k not in item]
        if missing:
            raise ValueError(f"{where}: {key}[{i}] lacks field(s) {missing}")


def validate_coco_dict(data, where="<dict>"):
    """Check the structure pycocotools and this package rely on; raise ValueError
    naming ``where`` and the first problem found."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: top level must be a json object, got {type(data).__name__}")
    _check_list_of_dicts(data, "images", where, ("id", "file_name"))
    _check_list_of_dicts(data, "categories", where, ("id", "name"))
    _check_list_of_dicts(data, "annotations", where, ("id", "image_id", "category_id", "bbox"))
    image_ids = [img["id"] for img in data["images"]]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError(f"{where}: duplicate image ids")
    cat_ids = [c["id"] for c in data["categories"]]
    if len(set(cat_ids)) != len(cat_ids):
        raise ValueError(f"{where}: duplicate category ids")
    image_ids, cat_ids = set(image_ids), set(cat_ids)
    for a in data["annotations"]:
        if a["image_id"] not in image_ids:
            raise ValueError(f"{where}: annotation {a['id']} refers to unknown image_id {a['image_id']}")
        if a["category_id"] not in cat_ids:
            raise ValueError(f"{where}: annotation {a['id']} refers to unknown category_id "
                             f"{a['category_id']}")
        bbox = a["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox)):
            raise ValueError(f"{where}: annotation {a['id']} has bbox {bbox!r}, expected 4 finite numbers [x, y, w, h]")


def _warn_degenerate_boxes(annotations, where):
    """Logs a warning with the counts of boxes of zero or negative width or height: they
    are no objects (training targets drop them) and usually mean a wrong bbox format."""
    negative = sum(1 for a in annotations if min(a["bbox"][2], a["bbox"][3]) < 0)
    zero = sum(1 for a in annotations if min(a["bbox"][2], a["bbox"][3]) == 0)
    if negative or zero:
        log.warning("%s: of %d boxes, %d have a zero and %d a negative width or height (expected "
                    "[x, y, w, h] with w, h > 0); they are dropped from the targets", where,
                    len(annotations), zero, negative)


def load_coco(ann):
    """A pycocotools COCO from a json path or an already loaded dict, validated.

    Raises FileNotFoundError for a missing file and ValueError (naming the file)
    for invalid JSON or a structure that is not COCO instances. Annotations without
    "iscrowd" / "area" get 0 / box area. pycocotools' own prints are swallowed.
    """
    if isinstance(ann, COCO):
        return ann
    where = "<dict>"
    if not isinstance(ann, dict):
        where = os.fspath(ann)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"annotation file not found: {where}")
        try:
            with open(where) as f:
                ann = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: invalid JSON ({err})") from err
    validate_coco_dict(ann, where)
    if where != "<dict>":  # once per file read, not again for each in-memory subset of it
        _warn_degenerate_boxes(ann["annotations"], where)
    if any("iscrowd" not in a or "area" not in a for a in ann["annotations"]):
        # COCOeval reads both; fill COCO's defaults in copies, leaving the caller's dict alone
        ann = dict(ann, annotations=[dict({"iscrowd": 0, "area": a["bbox"][2] * a["bbox"][3]}, **a)
                                     for a in ann["annotations"]])
    coco = COCO()
    coco.dataset = ann
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _source_name(ann):
    """How messages name an annotation source (a path, else a loaded dict or COCO)."""
    return os.fspath(ann) if isinstance(ann, (str, os.PathLike)) else "annotations"


def class_names_of(checkpoint):
    """Class names in label order from a checkpoint dict's ``categories`` and
    ``label_to_cat_id`` (what ``fqdetr train`` stores); None when it has neither."""
    categories, label_to_cat_id = checkpoint.get("categories"), checkpoint.get("label_to_cat_id")
    if categories is None and label_to_cat_id is None:
        return None
    by_id = {c["id"]: c["name"] for c in categories or []}
    unknown = [c for c in label_to_cat_id or [] if c not in by_id]
    if not label_to_cat_id or unknown:
        raise ValueError(f"checkpoint: label_to_cat_id {label_to_cat_id} names category ids {unknown} "
                         f"that its categories {sorted(by_id)} lack")
    return [by_id[c] for c in label_to_cat_id]


def match_categories(cats, class_names, where):
    """COCO category ids of ``cats`` ({id: category}) in the order of ``class_names``;
    ValueError naming ``where`` and the differing names when the two sets of names differ."""
    by_name = {c["name"]: cat_id for cat_id, c in cats.items()}
    if len(by_name) != len(cats):
        raise ValueError(f"{where}: category names repeat, so they cannot be matched to a model's classes")
    missing = [n for n in class_names if n not in by_name]
    extra = sorted(set(by_name) - set(class_names))
    if missing or extra:
        raise ValueError(f"{where}: its categories disagree with the model's {len(class_names)} classes: "
                         f"missing {missing}, not in the model {extra}")
    return [by_name[n] for n in class_names]


def _to_rgb(img, path):
    """8-bit RGB from any PIL mode. 16/32-bit integer images (16-bit PNG/TIFF: modes I;16*,
    I) are scaled from 0..65535 to 0..255; PIL's own conversion would clip them, turning
    most pixels white. Floating-point images have no agreed range and are refused."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"cannot read image {path}: {img.mode} values outside 0..65535 "
                             f"(min {arr.min():g}, max {arr.max():g})")
        return Image.fromarray(np.rint(arr / 257.0).astype(np.uint8)).convert("RGB")  # 2-D uint8: mode L
    if img.mode == "F":
        raise ValueError(f"cannot read image {path}: floating-point image (mode F) has no defined "
                         f"intensity range; convert it to 8- or 16-bit first")
    return img.convert("RGB")


def load_image(path):
    """Open ``path`` as an 8-bit RGB PIL image (grey, palette, RGBA, CMYK, 16-bit... are
    converted; see _to_rgb)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img, path)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def annotations_to_target(anns, image_id, width, height, cat_id_to_label, keep_crowd=False):
    """DETR-style target in absolute xyxy pixels from COCO annotations of one image.

    Returns {"boxes": float32 [n, 4] xyxy clipped to the image, "labels": int64 [n],
    "image_id": int64 [], "orig_size"/"size": int64 [2] (h, w), "iscrowd": int64 [n],
    "area": float32 [n]}. Crowd regions are dropped unless ``keep_crowd`` (DETR trains
    without them); boxes of zero width or height after clipping are dropped.
    """
    if not keep_crowd:
        anns = [a for a in anns if not a.get("iscrowd", 0)]
    boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    labels = torch.tensor([cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
    area = torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns],
                        dtype=torch.float32)
    iscrowd = torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)
    size = torch.tensor([height, width], dtype=torch.int64)
    return {"boxes": boxes[keep], "labels": labels[keep], "image_id": torch.tensor(image_id),
            "orig_size": size, "size": size.clone(), "iscrowd": iscrowd[keep], "area": area[keep]}


def finalize_target(image, target):
    """Image as a float tensor [3, H, W] (unnormalised [0, 1] if still PIL) and boxes
    converted from absolute xyxy to cxcywh normalised by (W, H)."""
    if isinstance(image, Image.Image):
        image = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    h, w = image.shape[-2:]
    b = target["boxes"]
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                          b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=-1)
    target = dict(target)
    target["boxes"] = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
    target["size"] = torch.tensor([h, w], dtype=torch.int64)
    return image, target


class CocoDetection(torch.utils.data.Dataset):
    """Detection dataset over a COCO instances json and its image folder.

    Item i: (image float32 [3, H, W], target) with target keys "boxes" [n, 4] (cxcywh
    normalised to the transformed image), "labels" [n] int64 in 0..C-1, "image_id",
    "orig_size" [2] and "size" [2] as (h, w), "iscrowd" [n], "area" [n].

    class_names: a model's classes, label k named class_names[k] (class_names_of a
    checkpoint): labels follow it, matched to this json's categories by name, so a json
    that numbers the same categories differently still gives the model's labels.
    Without it labels follow the sorted category ids.

    Attributes: ``coco`` (pycocotools COCO, for evaluation), ``ids`` (image ids in
    item order), ``cat_ids`` (COCO category ids in label order; label k <-> cat_ids[k]),
    ``label_to_cat_id`` (list), ``cat_id_to_label`` (dict), ``label_names``,
    ``supercategories`` ({supercategory: [labels]}), ``num_classes``.
    ``transforms(image, target)`` sees a PIL image and absolute xyxy boxes.
    """

    def __init__(self, img_folder, ann_file, transforms=None, keep_crowd=False,
                 image_ids=None, verify_images=False, class_names=None):
        self.img_folder = os.fspath(img_folder)
        if not os.path.isdir(self.img_folder):
            raise FileNotFoundError(f"image folder not found: {self.img_folder}")
        self.coco = load_coco(ann_file)
        self.transforms = transforms
        self.keep_crowd = keep_crowd
        self.ids = sorted(self.coco.imgs) if image_ids is None else list(image_ids)
        unknown = [i for i in self.ids if i not in self.coco.imgs]
        if unknown:
            raise ValueError(f"image_ids not in {ann_file}: {unknown[:5]}")
        self.cat_ids = (sorted(self.coco.cats) if class_names is None
                        else match_categories(self.coco.cats, class_names, _source_name(ann_file)))
        self.label_to_cat_id = list(self.cat_ids)
        self.cat_id_to_label = {c: k for k, c in enumerate(self.cat_ids)}
        self.label_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.supercategories = {}
        for k, c in enumerate(self.cat_ids):
            sup = self.coco.cats[c].get("supercategory") or self.coco.cats[c]["name"]
            self.supercategories.setdefault(sup, []).append(k)
        if verify_images:
            for i in self.ids:
                load_image(self.image_path(i))

    @property
    def num_classes(self):
        return len(self.cat_ids)

    def image_path(self, image_id):
        return os.path.join(self.img_folder, self.coco.imgs[image_id]["file_name"])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        image = load_image(self.image_path(image_id))
        w, h = image.size
        anns = self.coco.imgToAnns.get(image_id, [])
        target = annotations_to_target(anns, image_id, w, h, self.cat_id_to_label, self.keep_crowd)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return finalize_target(image, target)
