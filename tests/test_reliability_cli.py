"""Reliability of the command line: arguments checked before work, one-line errors, bad files.

Each test reproduces a mistake or an attack from issue #15 (items D, F, G, H).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import zipfile

import numpy as np
import pytest
from PIL import Image

import tlkit
from tlkit.cli import main

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

COLOURS = {"blue": (30, 60, 220), "red": (220, 40, 30)}


def _run(argv):
    """main(argv) with its stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(item) for item in argv])
    return code, out.getvalue(), err.getvalue()


def _images(folder, count=8, seed=0):
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for index in range(count):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (48, 48, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("colours"))


def _train_argv(data, out, *extra):
    return [
        "train",
        data,
        "--backbone",
        "mobilenet_v2",
        "--image-size",
        "64",
        "--epochs",
        "2",
        "--out",
        out,
        "--no-progress",
        *extra,
    ]


def _assert_one_line_error(code, stderr, *fragments):
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


# ---------------------------------------------------------------------------
# G: every argument is checked before any work, and leaves nothing behind.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--image-size", "0"], "image_size=0"),
        (["--batch-size", "0"], "batch_size=0"),
        (["--augmentation", "bogus"], "augmentation='bogus'"),
        (["--fine-tune-epochs", "1", "--fine-tune-blocks", "999"], "fine_tune_blocks=999"),
        (["--validation-split", "1.5"], "validation_split=1.5"),
        (["--epochs", "-1"], "epochs=-1"),
    ],
)
def test_bad_arguments_fail_before_any_work(image_folder, tmp_path, extra, fragment):
    out = tmp_path / "run"
    argv = _train_argv(image_folder, out, *extra)
    # --image-size is given twice for the first case; argparse keeps the last one.
    code, stdout, stderr = _run(argv)
    _assert_one_line_error(code, stderr, fragment, "Received:")
    assert not out.exists()  # No folder, so no checkpoints/ to block the rerun.
    assert "Features:" not in stdout  # Nothing was extracted.


def test_train_run_checks_the_config_before_making_the_folder(tmp_path):
    config = tlkit.TrainConfig(backbone="mobilenet_v2", image_size=0)
    with pytest.raises(ValueError, match="image_size must be an integer of at least 32"):
        tlkit.train_run(None, config, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="augmentation must be one of"):
        tlkit.TrainConfig(augmentation="bogus").validate()


@pytest.mark.slow
def test_the_corrected_rerun_after_a_rejected_run_succeeds(image_folder, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = _run(_train_argv(image_folder, out, "--batch-size", "0"))
    assert code == 2 and "batch_size=0" in stderr
    code, stdout, stderr = _run(_train_argv(image_folder, out, "--batch-size", "4"))
    assert code == 0, stderr
    assert "already holds a run" not in stderr
    assert json.loads((out / "metrics.json").read_text())["accuracy"] >= 0.5


# ---------------------------------------------------------------------------
# D: --validation-split 0.
# ---------------------------------------------------------------------------


def test_validation_split_zero_without_a_test_split_is_refused_up_front(image_folder, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = _run(_train_argv(image_folder, out, "--validation-split", "0"))
    _assert_one_line_error(code, stderr, "Nothing to evaluate on", "validation_split=0.0")
    assert not out.exists() and "Features:" not in stdout


@pytest.mark.slow
def test_validation_split_zero_with_a_test_folder_evaluates_on_it(tmp_path):
    data = tmp_path / "data"
    _images(data / "train", count=8, seed=0)
    _images(data / "test", count=4, seed=1)
    out = tmp_path / "run"
    code, stdout, stderr = _run(_train_argv(data, out, "--validation-split", "0"))
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test"
    assert {"accuracy", "per_class", "confusion_matrix"} <= set(metrics)
    assert np.asarray(metrics["confusion_matrix"]).sum() == 8
    assert "Accuracy:" in stdout


# ---------------------------------------------------------------------------
# F: one-line errors where there were tracebacks.
# ---------------------------------------------------------------------------


def test_out_under_a_regular_file_is_a_one_line_error(image_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, stderr = _run(_train_argv(image_folder, blocker / "run"))
    _assert_one_line_error(code, stderr, "Cannot write the run folder", "Not a directory")


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only filesystem (a tmpfs mounted ro); root ignores chmod, not this."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_out_on_a_read_only_filesystem_is_a_one_line_error(image_folder, read_only_folder):
    code, _, stderr = _run(_train_argv(image_folder, read_only_folder / "run"))
    _assert_one_line_error(code, stderr, "Read-only file system")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small, untrained tlkit classifier saved as .keras (no weights download)."""
    base = tlkit.build_feature_extractor("mobilenet_v2", 48, weights=None)
    head = tlkit.build_head(1280, 2)
    model = tlkit.build_classifier(
        "mobilenet_v2", 2, 48, base=base, head=head, class_names=["blue", "red"]
    )
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


def _rewrite_config(source, target, edit):
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["config.json"] = edit(members["config.json"].decode()).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_predict_with_a_model_naming_an_unknown_class(model_file, image_folder, tmp_path):
    evil = tmp_path / "evil.keras"
    # Keras raises a TypeError for this one; the command must not show a traceback.
    _rewrite_config(
        model_file,
        evil,
        lambda text: text.replace(
            '"module": "keras.src.models.functional", "class_name": "Functional"',
            '"module": null, "class_name": "Evil", "registered_name": "Evil>Layer"',
            1,
        ),
    )
    assert evil.read_bytes() != model_file.read_bytes()
    code, _, stderr = _run(["predict", evil, image_folder / "red" / "00.png"])
    _assert_one_line_error(code, stderr, "Cannot load the model", str(evil))


def test_predict_with_a_truncated_model_says_corrupt_not_missing(model_file, tmp_path):
    broken = tmp_path / "model.keras"
    data = model_file.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    code, _, stderr = _run(["predict", broken, "x.png"])
    _assert_one_line_error(code, stderr, "corrupt or truncated", str(broken))
    assert "not found" not in stderr.lower()


# ---------------------------------------------------------------------------
# G and H: predict's --top-k and bad files among good ones.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", ["0", "-1"])
def test_top_k_below_one_is_refused(model_file, image_folder, top_k):
    code, stdout, stderr = _run(
        ["predict", model_file, image_folder / "red" / "00.png", "--top-k", top_k]
    )
    _assert_one_line_error(code, stderr, f"top_k={top_k}")
    assert stdout == ""


def test_top_k_above_the_class_count_prints_every_class(model_file, image_folder):
    code, stdout, stderr = _run(
        ["predict", model_file, image_folder / "red" / "00.png", "--top-k", "5"]
    )
    assert code == 0, stderr
    ranked = stdout.strip().split(": ", 1)[1].split(", ")
    assert sorted(item.rsplit(" ", 1)[0] for item in ranked) == ["blue", "red"]


def test_predict_reports_each_bad_file_and_prints_the_good_ones(model_file, image_folder, tmp_path):
    good = image_folder / "red" / "00.png"
    text = tmp_path / "text.jpg"
    text.write_text("this is not an image")
    missing = tmp_path / "missing.png"
    code, stdout, stderr = _run(["predict", model_file, good, text, good, missing])
    assert code == 1
    assert "Traceback" not in stderr
    lines = stdout.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(good), str(good)]
    assert f"error: {text}:" in stderr and f"error: {missing}:" in stderr
    assert "2 of 4 image(s) failed" in stderr
