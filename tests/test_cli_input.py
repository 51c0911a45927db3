"""Command-line input: --config goes through argparse's checks, ranges are enforced, critical
sets join with '+', and errors are one line with exit code 2 (the traceback under --debug)."""
import subprocess
import sys

import pytest

from fqdetr.cli import build_parser, main
from fqdetr.cli._common import with_config
from fqdetr.data import make_builtin_dataset
from fqdetr.models import build_detr, save_detr_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model path, dataset folder): an untrained 16-class DETR and 4 + 4 built-in images."""
    root = tmp_path_factory.mktemp("cli_input")
    save_detr_checkpoint(build_detr("tiny", num_classes=16), root / "model.pth")
    make_builtin_dataset(root / "data", num_train=4, num_val=4, seed=0)
    return root / "model.pth", root / "data"


def _usage_error(argv, capsys):
    """argparse's complaint about ``argv`` (it exits with code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _config(tmp_path, text, name="c.yaml"):
    (tmp_path / name).write_text(text)
    return ["--config", str(tmp_path / name)]


@pytest.mark.parametrize("text, message", [
    ("calibration: bogus\n", "argument --calibration: invalid choice: 'bogus'"),
    ("calib_batches: 0\n", "argument --calib-batches: expected an integer >= 1, got 0"),
    ("w_bits: 12\n", "argument --w-bits: expected a bit-width in 2..8, got 12"),
    ("image_size: '-3'\n", "argument --image-size: expected an integer >= 1, got -3"),
    ("batch_size: [1, 2]\n", "batch_size expects one value, got [1, 2]"),
])
def test_config_values_pass_argparse_checks(tmp_path, capsys, text, message):
    argv = ["ptq", "--out", str(tmp_path), *_config(tmp_path, text)]
    if "expects one value" in message:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    else:
        assert message in _usage_error(argv, capsys)


def test_config_fills_options_and_the_command_line_wins(tmp_path):
    parser = build_parser()
    config = _config(tmp_path, '{"steps": 7, "lr": 0.001, "reg_estimator": "per-sample", "out": "o"}', "c.json")
    args = parser.parse_args(with_config(parser, ["qat", *config, "--steps", "3"]))
    assert (args.steps, args.lr, args.reg_estimator, args.out) == (3, 0.001, "per-sample", "o")
    config = _config(tmp_path, "objective: [overall, mix]\nhutchinson: true\n")
    args = parser.parse_args(with_config(parser, ["-v", "fisher", "--out", "o", *config]))
    assert args.objective == ["overall", "mix"] and args.hutchinson and args.verbose


@pytest.mark.parametrize("argv, message", [
    (["ptq", "--calib-batches", "0"], "argument --calib-batches: expected an integer >= 1, got 0"),
    (["ptq", "--image-size", "0"], "argument --image-size: expected an integer >= 1, got 0"),
    (["fisher", "--images", "-1"], "argument --images: expected an integer >= 1, got -1"),
    (["qat", "--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["qat", "--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
    (["train", "--data", "d", "--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
    (["demo", "--eval-images", "0"], "argument --eval-images: expected an integer >= 1, got 0"),
    (["reproduce", "--seeds", "0,x"], "argument --seeds: expected comma-separated integers, got '0,x'"),
])
def test_zero_and_negative_sizes_are_refused(tmp_path, capsys, argv, message):
    assert message in _usage_error([*argv, "--out", str(tmp_path)], capsys)


def test_plus_joined_critical_sets_in_every_command(setup):
    from fqdetr.data import CocoDetection, builtin_paths
    from fqdetr.engine.setup import critical_setup

    model_path, data = setup
    model = build_detr("tiny", num_classes=16)
    val = CocoDetection(*builtin_paths(data, "val"))
    person = critical_setup(model, val, "person")[2]
    animal = critical_setup(model, val, "animal")[2]
    _, _, S, sets = critical_setup(model, val, "person+animal")
    assert S == sorted(person + animal) and len(S) == 8 and "person+animal" in sets
    by_id = critical_setup(model, val, "1+cat")[2]  # a category id and a name
    assert by_id == sorted([val.cat_id_to_label[1], val.label_names.index("cat")])
    with pytest.raises(ValueError, match="'persn' is neither"):
        critical_setup(model, val, "persn+animal")


def test_errors_are_one_line_and_debug_keeps_the_traceback(setup, tmp_path, capsys):
    model_path, data = setup
    argv = ["fisher", "--model", str(model_path), "--data", str(data), "--out", str(tmp_path),
            "--critical", "persn"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fqdetr fisher: error: critical set: 'persn' is neither") and "\n" not in err
    with pytest.raises(ValueError, match="'persn' is neither"):
        main(["--debug", *argv])
    with pytest.raises(ValueError, match="'persn' is neither"):
        main([*argv, "--debug"])


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    """The real process: python -m fqdetr, exit status 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "fqdetr", "ptq", "--model", str(tmp_path / "nope.pth"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fqdetr ptq: error: --model: {tmp_path / 'nope.pth'} does not exist"


def test_cli_constants_match_the_data_layout():
    from fqdetr.cli import _common
    from fqdetr.data import layout

    assert (_common.BUILTIN, _common.DEFAULT_BUILTIN_DIR) == (layout.BUILTIN, layout.DEFAULT_BUILTIN_DIR)
