"""fqdetr.io's JSON and figure writers, and the one number format of the reports."""
import json
import os

import numpy as np
import pytest
import torch

from fqdetr.evaluation import format_ap
from fqdetr.io import atomic_savefig, write_json


def test_write_json_converts_numbers_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "sub" / "r.json"
    returned = write_json({"a": np.float32(0.5), "b": torch.tensor([1, 2]), "c": np.arange(3), "d": None}, path)
    assert returned == str(path) and json.loads(path.read_text()) == {"a": 0.5, "b": [1, 2], "c": [0, 1, 2],
                                                                       "d": None}
    assert path.read_text().startswith("{\n  ")  # indent 2 by default
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        write_json({"x": object()}, path)
    assert json.loads(path.read_text())["b"] == [1, 2] and os.listdir(path.parent) == ["r.json"]
    write_json({"f": len}, path, indent=None, other=str)  # a settings snapshot: anything as text
    assert path.read_text() == '{"f": "<built-in function len>"}'


def test_atomic_savefig_writes_a_png_and_no_temporary_file(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_savefig(fig, tmp_path / "p.png")
    plt.close(fig)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["p.png"]


def test_format_ap():
    assert [format_ap(0.4567), format_ap(None), format_ap(0.4567, scale=1.0), format_ap(0.0)] == \
        ["45.7", "n/a", "0.5", "0.0"]
