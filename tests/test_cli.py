"""The command line, run in-process on a tiny folder dataset; and atomic writes."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from tlkit._io import atomic_path
from tlkit.backbones import list_backbones
from tlkit.cli import main

COLOURS = {"blue": (30, 60, 220), "red": (220, 40, 30)}
RUN_FILES = ("model.keras", "metrics.json", "training_curves.png", "confusion_matrix.png")


def _run(argv):
    """main(argv) with its stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """2 classes x 12 noisy 64 px images of clearly different colours, and one corrupt file."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir()
        for index in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (64, 64, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{name}_{index:02d}.png")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory, tlkit_cache_dir):
    run = tmp_path_factory.mktemp("runs") / "colours-run"
    argv = [
        "train",
        str(image_folder),
        "--backbone",
        "mobilenet_v2",
        "--image-size",
        "64",
        # 20 head epochs on cached features cost ~2 s and separate the colours.
        "--epochs",
        "20",
        "--fine-tune-epochs",
        "1",
        "--out",
        str(run),
        "--no-progress",
    ]
    code, stdout, stderr = _run(argv)
    return run, argv, code, stdout, stderr


@pytest.mark.slow
def test_train_writes_a_complete_run_folder(trained):
    run, _, code, stdout, stderr = trained
    assert code == 0, stderr
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # No temp files left.
    assert "broken.jpg" in stdout  # The data report is printed.
    assert f"Run written to {run}" in stdout

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] == 1.0  # Red against blue: ImageNet features separate them.
    assert set(metrics["per_class"]) == {"blue", "red"}
    assert np.asarray(metrics["confusion_matrix"]).shape == (2, 2)
    assert (
        np.asarray(metrics["confusion_matrix"]).sum() == metrics["dataset"]["sizes"]["validation"]
    )
    assert {
        "build_s",
        "feature_extraction_s",
        "head_training_s",
        "fine_tuning_s",
        "total_s",
    } <= set(metrics["timings"])
    assert {"tlkit", "tensorflow", "keras", "numpy", "python"} <= set(metrics["versions"])
    assert metrics["seed"] == 42
    assert metrics["config"]["backbone"] == "mobilenet_v2" and metrics["config"]["image_size"] == 64
    skipped = [path for path, _ in metrics["dataset"]["skipped_files"]]
    assert [p for p in skipped if p.endswith("broken.jpg")], skipped
    assert sum(metrics["dataset"]["sizes"].values()) == 24  # The corrupt file is not counted.
    assert set(metrics["histories"]) == {"head", "fine_tune"}


@pytest.mark.slow
def test_existing_run_is_not_overwritten(trained):
    run, argv, code, _, _ = trained
    assert code == 0
    before = {name: (run / name).stat().st_mtime_ns for name in RUN_FILES}
    again, stdout, stderr = _run(argv)
    assert again == 2
    assert "--overwrite" in stderr and str(run) in stderr
    assert "Traceback" not in stderr
    assert {name: (run / name).stat().st_mtime_ns for name in RUN_FILES} == before


@pytest.mark.slow
def test_predict_prints_class_names(trained, image_folder):
    run, _, code, _, _ = trained
    assert code == 0
    images = [image_folder / "red" / "red_00.png", image_folder / "blue" / "blue_00.png"]
    status, stdout, stderr = _run(
        ["predict", str(run / "model.keras"), *map(str, images), "--top-k", "2"]
    )
    assert status == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    for line, image, expected in zip(lines, images, ["red", "blue"], strict=True):
        path, ranked = line.split(": ", 1)
        assert path == str(image)
        names = [item.rsplit(" ", 1)[0] for item in ranked.split(", ")]
        scores = [float(item.rsplit(" ", 1)[1]) for item in ranked.split(", ")]
        assert names == [expected, ({"red", "blue"} - {expected}).pop()]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(
            1.0, abs=2e-3
        )


def test_predict_missing_model(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "model.keras"), "x.png"]) == 2
    assert "No model file" in capsys.readouterr().err


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    code = main(["train", str(missing), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "neither an existing folder nor a dataset name" in err
    assert str(missing) in err


def test_unknown_backbone_is_a_clear_error(image_folder, tmp_path, capsys):
    code = main(["train", str(image_folder), "--backbone", "nope", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "Received: backbone='nope'" in capsys.readouterr().err


def test_backbones_lists_offline_ones_first(capsys):
    assert main(["backbones"]) == 0
    lines = capsys.readouterr().out.splitlines()
    offline = list_backbones(offline_only=True)
    assert [line.split()[0] for line in lines[: len(offline)]] == offline
    assert any(line.split()[0] == "resnet50" for line in lines)


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Atomic writes.
# ---------------------------------------------------------------------------


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "model.weights.h5"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as temporary:
            assert temporary.parent == tmp_path and temporary.name.endswith(".weights.h5")
            temporary.write_text("half-written")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.weights.h5"]


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "metrics.json"  # The folder is created.
    with atomic_path(target) as temporary:
        assert not target.exists()
        temporary.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]
