"""COCO dataset reading, DETR transforms, collate and the built-in generated dataset."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fqdetr.cli import main as cli_main
from fqdetr.data import (BUILTIN, CocoDetection, PadToCanvas, builtin_paths, dataset_stats,
                         make_builtin_dataset, make_transforms, resolve_dataset)
from fqdetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Compose, RandomHorizontalFlip, ToTensor

CATS = [{"id": 5, "name": "cat_a", "supercategory": "g1"},
        {"id": 9, "name": "cat_b", "supercategory": "g1"},
        {"id": 17, "name": "cat_c", "supercategory": "g2"}]


def _ann(i, image_id, cat, bbox, crowd=0):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": crowd}


def write_tiny_coco(root, extra=None):
    """3 images: RGB 40x30 with boxes, grey 20x24 without any, palette 16x16 with one.
    Returns (img_folder, ann_file)."""
    folder = root / "images"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(folder / "a.png")
    Image.new("L", (20, 24), 128).save(folder / "b.png")
    Image.new("P", (16, 16), 3).save(folder / "c.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 20, "height": 24},
                   {"id": 7, "file_name": "c.png", "width": 16, "height": 16}],
        "annotations": [_ann(1, 1, 9, [4, 6, 10, 8]),
                        _ann(2, 1, 17, [30, 20, 20, 20]),       # clipped to 10 x 10
                        _ann(3, 1, 5, [0, 0, 40, 30], crowd=1),  # crowd: dropped
                        _ann(4, 1, 5, [12, 12, 0, 5]),          # zero width: dropped
                        _ann(5, 7, 5, [0, 0, 8, 4])],
        "categories": CATS,
    }
    if extra:
        extra(data)
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return folder, ann


def test_targets_are_detr_style(tmp_path):
    ds = CocoDetection(*write_tiny_coco(tmp_path))
    assert len(ds) == 3 and ds.num_classes == 3
    assert ds.cat_ids == [5, 9, 17] and ds.label_to_cat_id == [5, 9, 17]
    assert ds.cat_id_to_label == {5: 0, 9: 1, 17: 2}
    assert ds.supercategories == {"g1": [0, 1], "g2": [2]}
    img, t = ds[0]
    assert img.shape == (3, 30, 40) and img.dtype == torch.float32
    assert t["labels"].tolist() == [1, 2] and t["labels"].dtype == torch.int64
    # [4, 6, 10, 8] xywh -> centre (9, 10), normalised by (40, 30); second box clipped to [30, 20, 40, 30]
    expected = torch.tensor([[9 / 40, 10 / 30, 10 / 40, 8 / 30], [35 / 40, 25 / 30, 10 / 40, 10 / 30]])
    torch.testing.assert_close(t["boxes"], expected)
    assert int(t["image_id"]) == 1
    assert t["orig_size"].tolist() == [30, 40] and t["size"].tolist() == [30, 40]
    assert t["iscrowd"].tolist() == [0, 0] and t["area"].tolist() == [80.0, 400.0]


def test_keep_crowd(tmp_path):
    ds = CocoDetection(*write_tiny_coco(tmp_path), keep_crowd=True)
    _, t = ds[0]
    assert t["iscrowd"].tolist() == [0, 0, 1]


def test_empty_annotations_and_non_rgb(tmp_path):
    ds = CocoDetection(*write_tiny_coco(tmp_path))
    img, t = ds[1]  # greyscale image, no annotations
    assert img.shape == (3, 24, 20)
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    img, t = ds[2]  # palette image
    assert img.shape == (3, 16, 16) and t["labels"].tolist() == [0]
    assert torch.allclose(img[0], img[0, 0, 0].expand(16, 16))


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d.pop("images"), "'images'"),
    (lambda d: d.pop("categories"), "'categories'"),
    (lambda d: d.update(annotations={}), "must be a list"),
    (lambda d: d["annotations"][0].update(image_id=99), "unknown image_id 99"),
    (lambda d: d["annotations"][0].update(category_id=3), "unknown category_id 3"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox"),
    (lambda d: d["images"][0].pop("file_name"), "file_name"),
])
def test_corrupt_json_raises_clear_error(tmp_path, corrupt, message):
    folder, ann = write_tiny_coco(tmp_path, extra=corrupt)
    with pytest.raises(ValueError, match=message) as err:
        CocoDetection(folder, ann)
    assert "ann.json" in str(err.value)


def test_invalid_json_and_missing_files(tmp_path):
    folder, ann = write_tiny_coco(tmp_path)
    ann.write_text('{"images": [')
    with pytest.raises(ValueError, match="ann.json: invalid JSON"):
        CocoDetection(folder, ann)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(folder, tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="image folder"):
        CocoDetection(tmp_path / "no_folder", ann)


def test_missing_and_unreadable_image(tmp_path):
    folder, ann = write_tiny_coco(tmp_path)
    ds = CocoDetection(folder, ann)
    os.remove(folder / "b.png")
    with pytest.raises(FileNotFoundError, match="b.png"):
        ds[1]
    (folder / "c.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="cannot read image .*c.png"):
        ds[2]
    with pytest.raises(FileNotFoundError, match="b.png"):
        CocoDetection(folder, ann, verify_images=True)


def _bright_box(img):
    """xyxy extent of the pixels brighter than half (image [3, H, W] in [0, 1])."""
    ys, xs = torch.nonzero(img.mean(0) > 0.5, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _cxcywh_to_pixels(boxes, size):
    h, w = size.tolist()
    cx, cy, bw, bh = (boxes[0] * torch.tensor([w, h, w, h])).tolist()
    return torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])


@pytest.mark.parametrize("seed", range(6))
def test_train_transforms_keep_boxes_on_the_object(tmp_path, seed):
    """A white rectangle stays under its box through random flip + resize."""
    folder = tmp_path / "images"
    folder.mkdir()
    img = np.zeros((60, 90, 3), np.uint8)
    img[10:30, 5:35] = 255  # box xywh [5, 10, 30, 20]
    Image.fromarray(img).save(folder / "x.png")
    data = {"images": [{"id": 1, "file_name": "x.png"}], "categories": CATS,
            "annotations": [_ann(1, 1, 5, [5, 10, 30, 20])]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    tf = make_transforms("train", scales=(40, 60, 97), max_size=150, rng=random.Random(seed))
    image, t = CocoDetection(folder, tmp_path / "a.json", transforms=tf)[0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = image * std + mean
    assert t["size"].tolist() == list(image.shape[1:])
    assert min(image.shape[1:]) in (40, 60, 97)
    box = _cxcywh_to_pixels(t["boxes"], t["size"])
    assert torch.allclose(box, _bright_box(pixels), atol=1.0)  # 1 px: bilinear edge rounding
    scale = image.shape[1] / 60
    assert t["area"].item() == pytest.approx(600 * scale * scale, rel=0.03)


def test_hflip_boxes_exact():
    img = np.zeros((20, 50, 3), np.uint8)
    img[2:7, 3:13] = 255
    target = {"boxes": torch.tensor([[3.0, 2.0, 13.0, 7.0]])}
    tf = Compose([RandomHorizontalFlip(p=1.0), ToTensor()])
    out, t = tf(Image.fromarray(img), target)
    assert t["boxes"].tolist() == [[37.0, 2.0, 47.0, 7.0]]
    assert torch.equal(_bright_box(out), t["boxes"][0])


def test_val_transform_and_unknown_split():
    tf = make_transforms("val", scales=(64, 96), max_size=120)
    out, _ = tf(Image.new("RGB", (200, 100)), {"boxes": torch.zeros(0, 4)})
    assert out.shape == (3, 60, 120)  # shorter side 96 would make the long side 192 > 120
    with pytest.raises(ValueError, match="unknown split"):
        make_transforms("training")


def test_collate_pads_and_masks():
    a, b = torch.rand(3, 5, 7), torch.rand(3, 8, 4)
    images, mask, targets = PadToCanvas(8)([(a, {"i": 0}), (b, {"i": 1})])
    assert images.shape == (2, 3, 8, 8) and mask.shape == (2, 8, 8) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :5, :7], a) and torch.equal(images[1, :, :8, :4], b)
    assert not mask[0, :5, :7].any() and mask[0, 5:].all()
    assert not mask[1, :, :4].any() and mask[1, :, 4:].all()
    assert images[0, :, 5:].abs().sum() == 0 and [t["i"] for t in targets] == [0, 1]


# ---------------------------------------------------------------- built-in dataset

@pytest.fixture(scope="module")
def builtin_200(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin")
    make_builtin_dataset(root, num_train=200, num_val=8, image_size=128, seed=3)
    return root


def _split_bytes(root, split):
    folder, ann = builtin_paths(root, split)
    return open(ann, "rb").read(), {f: open(os.path.join(folder, f), "rb").read()
                                    for f in sorted(os.listdir(folder))}


def test_builtin_is_deterministic(tmp_path):
    make_builtin_dataset(tmp_path / "a", num_train=6, num_val=2, seed=11)
    make_builtin_dataset(tmp_path / "b", num_train=6, num_val=2, seed=11)
    make_builtin_dataset(tmp_path / "c", num_train=6, num_val=2, seed=12)
    make_builtin_dataset(tmp_path / "d", num_train=3, num_val=2, seed=11)
    for split in ("train", "val"):
        assert _split_bytes(tmp_path / "a", split) == _split_bytes(tmp_path / "b", split)
    json_a, images_a = _split_bytes(tmp_path / "a", "train")
    json_c, images_c = _split_bytes(tmp_path / "c", "train")
    assert json_a != json_c and images_a["000000.jpg"] != images_c["000000.jpg"]
    _, images_d = _split_bytes(tmp_path / "d", "train")  # image i does not depend on N
    assert images_d == {k: images_a[k] for k in images_d}


def test_builtin_stats(builtin_200):
    _, ann = builtin_paths(builtin_200, "train")
    stats = dataset_stats(ann)
    assert stats["num_images"] == 200
    assert len(stats["per_supercategory"]) >= 4 and len(stats["per_category"]) >= 12
    counts = sorted(stats["per_category"].values())
    assert counts[0] >= 1 and counts[-1] >= 5 * counts[0]  # long tail
    assert all(stats["per_size"][k] > 0 for k in ("small", "medium", "large"))
    per_image = json.load(open(ann))
    sizes = {(im["width"], im["height"]) for im in per_image["images"]}
    assert len(sizes) > 1 and all(128 <= s <= 160 for wh in sizes for s in wh)


def test_builtin_loads_and_batches(builtin_200):
    folder, ann = builtin_paths(builtin_200, "val")
    ds = CocoDetection(folder, ann, transforms=make_transforms("train", scales=(96, 128), max_size=160))
    assert ds.num_classes >= 12 and len(ds.supercategories) >= 4
    images, mask, targets = PadToCanvas(160)([ds[i] for i in range(4)])
    assert images.shape[:2] == (4, 3) and mask.shape == (4,) + images.shape[2:]
    for t in targets:
        assert t["boxes"].numel() and (t["boxes"] > 0).all() and (t["boxes"] <= 1).all()
        assert t["labels"].max() < ds.num_classes


def test_builtin_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        make_builtin_dataset(tmp_path, num_train=1, num_val=1, image_size=8)


def test_cli_data_make_and_stats(tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli_main(["data", "make", "--out", str(out), "--num-train", "3", "--num-val", "2",
                     "--seed", "1", "--image-size", "96", "--no-progress"]) == 0
    assert len(os.listdir(out / "train")) == 3 and len(os.listdir(out / "val")) == 2
    capsys.readouterr()
    assert cli_main(["data", "stats", str(out / "annotations" / "instances_val.json")]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 2


# ---------------------------------------------------------------- dataset layouts

def _coco2017(root, splits=("train", "val")):
    """A COCO-2017 layout (DIR/{split}2017/, DIR/annotations/instances_{split}2017.json) of tiny_coco."""
    root.mkdir(parents=True)
    folder, ann = write_tiny_coco(root)
    (root / "annotations").mkdir()
    for split in splits:
        shutil.copytree(folder, root / f"{split}2017")
        shutil.copy(ann, root / "annotations" / f"instances_{split}2017.json")


def test_resolve_reads_both_layouts(tmp_path):
    make_builtin_dataset(tmp_path / "b", num_train=2, num_val=2, seed=0)
    paths = resolve_dataset(tmp_path / "b")
    assert paths == {s: builtin_paths(tmp_path / "b", s) for s in ("train", "val")}
    _coco2017(tmp_path / "c")
    paths = resolve_dataset(tmp_path / "c")
    for split in ("train", "val"):
        assert paths[split] == (str(tmp_path / "c" / f"{split}2017"),
                                str(tmp_path / "c" / "annotations" / f"instances_{split}2017.json"))
        assert len(CocoDetection(*paths[split])) == 3


def test_resolve_never_fills_a_mistyped_or_foreign_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data: .*typo does not exist.*instances_val2017\.json"):
        resolve_dataset(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    (tmp_path / "other" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds neither layout"):
        resolve_dataset(tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["images"]
    _coco2017(tmp_path / "half", splits=("val",))  # val2017 without train2017
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        resolve_dataset(tmp_path / "half")
    assert set(resolve_dataset(tmp_path / "half", splits=("val",))) == {"val"}
    _coco2017(tmp_path / "noimg")
    (tmp_path / "noimg" / "val2017").rename(tmp_path / "noimg" / "elsewhere")
    with pytest.raises(FileNotFoundError, match="image folder .*val2017 does not"):
        resolve_dataset(tmp_path / "noimg")


def test_builtin_is_generated_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = resolve_dataset(BUILTIN, num_train=3, num_val=2)
    assert paths["val"] == builtin_paths(os.path.join("data", "builtin"), "val")
    assert len(CocoDetection(*paths["train"])) == 3 and len(CocoDetection(*paths["val"])) == 2
    stamp = os.stat(paths["val"][1]).st_mtime_ns
    # The default folder, named as a path, is the same request; an existing dataset is reused.
    again = resolve_dataset(tmp_path / "data" / "builtin", num_train=9, num_val=9)
    assert os.path.samefile(again["val"][1], paths["val"][1]) and len(CocoDetection(*again["val"])) == 2
    assert os.stat(paths["val"][1]).st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError):
        resolve_dataset(tmp_path / "data" / "builtin2")


def test_cli_data_typo_is_an_error_not_a_dataset(tmp_path, capsys):
    from fqdetr.models import build_detr, save_detr_checkpoint

    save_detr_checkpoint(build_detr("tiny", num_classes=3), tmp_path / "m.pth")
    assert cli_main(["ptq", "--model", str(tmp_path / "m.pth"), "--data", str(tmp_path / "dat"),
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fqdetr ptq: error: --data:") and "dat does not exist" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "dat").exists()


def test_degenerate_boxes_are_counted_in_a_warning(tmp_path, caplog):
    def degenerate(data):
        data["annotations"].append(_ann(6, 2, 9, [1, 1, -3, 4]))
    _, ann = write_tiny_coco(tmp_path, degenerate)
    with caplog.at_level("WARNING", logger="fqdetr.data.coco"):
        CocoDetection(tmp_path / "images", ann)
    assert "of 6 boxes, 1 have a zero and 1 a negative width or height" in caplog.text
