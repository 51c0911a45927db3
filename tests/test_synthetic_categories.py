"""The built-in generator's two category counts: 16 (the default, byte-identical to the
generator before the second count) and 32 (finding 5 of docs/METHOD.md section 6)."""
import collections
import hashlib
import json

import numpy as np
import pytest

from fqdetr.cli import main as cli_main
from fqdetr.data import CocoDetection, builtin_paths, make_builtin_dataset
from fqdetr.data.synthetic import _make_image
from fqdetr.data.synthetic_categories import ALL_CATEGORIES, categories

GROUPS = ("person", "vehicle", "animal", "sign")


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("per_group", [4, 8])
def test_table_has_per_group_categories_in_each_supercategory(per_group):
    table = categories(per_group)
    assert len(table) == 4 * per_group
    assert len({c[0] for c in table}) == len({c[1] for c in table}) == 4 * per_group
    for g, group in enumerate(GROUPS):
        rows = [c for c in table if c[2] == group]
        assert [c[0] for c in rows] == [10 * g + r for r in range(1, per_group + 1)]
        weights = [c[3] for c in rows]
        assert weights == sorted(weights, reverse=True)  # a long tail inside every group
    assert [c[0] for c in table] == sorted(c[0] for c in table)


def test_16_categories_are_the_32_without_ranks_5_to_8():
    assert categories(4) == [c for c in categories(8) if c[0] % 10 <= 4]
    assert categories(8) == ALL_CATEGORIES
    # the added ranks continue each group's tail below its rank 4, the rarest at 1.0
    for group in GROUPS:
        rank4 = next(c[3] for c in ALL_CATEGORIES if c[2] == group and c[0] % 10 == 4)
        added = [c[3] for c in ALL_CATEGORIES if c[2] == group and c[0] % 10 > 4]
        assert max(added) < rank4 and min(added) == 1.0


def test_every_one_of_32_categories_is_drawn():
    counts = collections.Counter()
    for i in range(400):
        _, objects = _make_image(0, "train", i, 128, categories_per_group=8)
        counts.update(categories(8)[k][1] for k, _ in objects)
    assert set(counts) == {c[1] for c in ALL_CATEGORIES}
    assert counts["adult"] > 10 * min(counts.values())  # the tail stays long


def test_32_categories_are_deterministic_per_image():
    img_a, obj_a = _make_image(5, "val", 17, 128, categories_per_group=8)
    img_b, obj_b = _make_image(5, "val", 17, 128, categories_per_group=8)
    assert obj_a == obj_b and np.array_equal(np.asarray(img_a), np.asarray(img_b))
    img_c, _ = _make_image(5, "val", 18, 128, categories_per_group=8)
    assert not np.array_equal(np.asarray(img_a)[:64, :64], np.asarray(img_c)[:64, :64])


# Byte-identity regression test: SHA-256 of files made by the generator before the
# 32-category form existed (make_builtin_dataset(tmp, num_train=6, num_val=6, seed=0)).
# The jsons depend only on numpy's generator; the JPEGs also on Pillow's drawing and
# encoder (recorded with Pillow 13.0.0): a Pillow upgrade may legitimately move them.
GOLDEN = {
    "annotations/instances_train.json": "65fad25e11018384feb40b8aed6df345f84a10f7b7940b3cb680982fd221e35e",
    "annotations/instances_val.json": "7fe9e6ffb8c0951a1bf44a06e023b3703fb1620fbe3e1ff79895a9575d5a8614",
    "train/000000.jpg": "66a615a9419f1a1da1030ddb0f883f8ebb50431b78a92654481ecdb26ab474b1",
    "val/000005.jpg": "e3aff609e0dac9097ee63e0102841113a2ff7e6e9d6ef5b3279eb8aef5febbf2",
}


def test_default_is_byte_identical_to_the_16_category_generator(tmp_path):
    make_builtin_dataset(tmp_path, num_train=6, num_val=6, seed=0)
    assert {name: _sha256(tmp_path / name) for name in GOLDEN} == GOLDEN
    make_builtin_dataset(tmp_path / "explicit", num_train=6, num_val=6, seed=0, categories_per_group=4)
    assert {name: _sha256(tmp_path / "explicit" / name) for name in GOLDEN} == GOLDEN


@pytest.mark.parametrize("bad, error", [(3, ValueError), (16, ValueError), ("8", TypeError),
                                        (True, TypeError), (8.0, TypeError)])
def test_bad_categories_per_group_is_refused_before_writing(tmp_path, bad, error):
    with pytest.raises(error, match="categories_per_group"):
        make_builtin_dataset(tmp_path / "ds", num_train=1, num_val=1, categories_per_group=bad)
    assert not (tmp_path / "ds").exists()
    with pytest.raises(error, match="categories_per_group"):
        categories(bad)


def test_cli_categories_per_group_reaches_the_json(tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli_main(["data", "make", "--out", str(out), "--num-train", "4", "--num-val", "2",
                     "--image-size", "64", "--categories-per-group", "8", "--no-progress"]) == 0
    folder, ann = builtin_paths(out, "train")
    data = json.loads(open(ann).read())
    assert data["info"]["categories_per_group"] == 8
    assert [c["id"] for c in data["categories"]] == [c[0] for c in ALL_CATEGORIES]
    assert CocoDetection(folder, ann).num_classes == 32
    capsys.readouterr()
    assert cli_main(["data", "stats", str(ann)]) == 0
    assert json.loads(capsys.readouterr().out)["num_categories"] == 32
    with pytest.raises(SystemExit):  # argparse choices: only 4 or 8
        cli_main(["data", "make", "--out", str(tmp_path / "bad"), "--categories-per-group", "16"])
    assert not (tmp_path / "bad").exists()


def test_cli_default_writes_16_categories_without_the_key(tmp_path):
    assert cli_main(["data", "make", "--out", str(tmp_path), "--num-train", "1", "--num-val", "1",
                     "--image-size", "64", "--no-progress"]) == 0
    data = json.loads(open(builtin_paths(tmp_path, "val")[1]).read())
    assert "categories_per_group" not in data["info"]
    assert [c["id"] for c in data["categories"]] == [c[0] for c in categories(4)]
