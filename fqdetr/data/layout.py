"""Where a dataset's images and annotations are: the one resolver every command uses.

Two layouts are read:

- built-in (what ``fqdetr data make --out DIR`` writes): ``DIR/{train,val}/`` and
  ``DIR/annotations/instances_{train,val}.json``;
- COCO 2017: ``DIR/{train,val}2017/`` and ``DIR/annotations/instances_{train,val}2017.json``.

The built-in dataset is generated only when asked for: ``--data builtin`` (or the commands'
default folder, ``data/builtin``). Any other folder without one of the layouts is an error,
so a mistyped path is never filled with generated images.
"""
import logging
import os
from pathlib import Path

from fqdetr.data.synthetic import make_builtin_dataset

log = logging.getLogger(__name__)

BUILTIN = "builtin"
DEFAULT_BUILTIN_DIR = os.path.join("data", "builtin")
# (image folder, annotation file) of a split, relative to the dataset root, per layout.
LAYOUTS = {
    "built-in": ("{split}", os.path.join("annotations", "instances_{split}.json")),
    "COCO 2017": ("{split}2017", os.path.join("annotations", "instances_{split}2017.json")),
}


def is_builtin_request(data):
    """True for ``builtin`` and for the default folder ``data/builtin`` (relative to the
    working directory): the two ways of asking for the generated dataset."""
    if os.fspath(data) == BUILTIN:
        return True
    return Path(data).resolve() == Path(DEFAULT_BUILTIN_DIR).resolve()


def _layout_paths(root, layout, split):
    folder, ann = LAYOUTS[layout]
    return os.path.join(root, folder.format(split=split)), os.path.join(root, ann.format(split=split))


def _find_layout(root, splits):
    """The name of the layout whose annotation files of every split exist under ``root``."""
    for layout in LAYOUTS:
        if all(os.path.isfile(_layout_paths(root, layout, s)[1]) for s in splits):
            return layout
    return None


def _missing_message(data, root, splits):
    expected = "; ".join(f"{name}: " + ", ".join(_layout_paths(root, name, s)[1] for s in splits)
                         for name in LAYOUTS)
    where = f"{root} does not exist" if not os.path.exists(root) else f"{root} holds neither layout"
    return (f"--data: {where} (expected {expected}). Make the built-in dataset with "
            f"'fqdetr data make --out {data}' or pass --data {BUILTIN}")


def resolve_dataset(data, splits=("train", "val"), num_train=2000, num_val=500):
    """{split: (image folder, annotation json)} of the dataset ``data`` names.

    data: a dataset folder in one of LAYOUTS, or ``builtin`` / the default folder
        ``data/builtin``, where the built-in dataset (``num_train`` / ``num_val`` images,
        seed 0) is generated when that folder has none yet.
    Raises FileNotFoundError naming the folder and the files expected there otherwise.
    """
    splits = tuple(splits)
    root = DEFAULT_BUILTIN_DIR if os.fspath(data) == BUILTIN else os.fspath(data)
    layout = _find_layout(root, splits)
    if layout is None and is_builtin_request(data):
        log.info("generating the built-in dataset in %s (%d train / %d val images)", root, num_train, num_val)
        make_builtin_dataset(root, num_train=num_train, num_val=num_val, seed=0)
        layout = "built-in"
    if layout is None:
        raise FileNotFoundError(_missing_message(data, root, splits))
    paths = {s: _layout_paths(root, layout, s) for s in splits}
    for split, (folder, ann) in paths.items():
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--data: {ann} exists but its image folder {folder} does not")
    return paths
