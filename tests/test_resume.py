"""Interrupted runs resume to the same result; runs are reproducible with a seed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """Two classes of 20 small photos-like images: noisy red-ish vs. blue-ish."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for label, channel in (("red", 0), ("blue", 2)):
        (root / label).mkdir()
        for index in range(20):
            pixels = rng.integers(0, 120, (48, 48, 3), dtype=np.uint8)
            pixels[..., channel] = rng.integers(120, 256, (48, 48), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    return root


def _command(data, out, *extra):
    return [
        sys.executable,
        "-m",
        "tlkit",
        "train",
        str(data),
        "--backbone",
        "mobilenet_v2",
        "--image-size",
        "64",
        "--epochs",
        "2",
        "--fine-tune-epochs",
        "4",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "--no-progress",
        "--deterministic",
        *extra,
    ]


def _environment(cache):
    return {**os.environ, "TLKIT_CACHE_DIR": str(cache), "TF_CPP_MIN_LOG_LEVEL": "3"}


def _state(out):
    try:
        return json.loads((out / "checkpoints" / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_sigkill_mid_epoch_then_resume_gives_the_same_result(tiny_folder, tmp_path):
    environment = _environment(tmp_path / "cache")
    reference = tmp_path / "reference"
    subprocess.run(
        _command(tiny_folder, reference), env=environment, check=True, capture_output=True
    )

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        _command(tiny_folder, interrupted),
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while _state(interrupted).get("fine_tune_epochs_done", 0) < 1:
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # Into the next epoch.
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = _state(interrupted)["fine_tune_epochs_done"]
    assert 1 <= done < 4, "the kill should land before the last epoch"
    assert not (interrupted / "model.keras").exists()

    subprocess.run(
        _command(tiny_folder, interrupted, "--resume"),
        env=environment,
        check=True,
        capture_output=True,
    )
    expected = json.loads((reference / "metrics.json").read_text())
    resumed = json.loads((interrupted / "metrics.json").read_text())
    assert resumed["resumed"] is True and expected["resumed"] is False
    assert resumed["accuracy"] == expected["accuracy"]
    np.testing.assert_allclose(
        resumed["histories"]["fine_tune"]["loss"],
        expected["histories"]["fine_tune"]["loss"],
        rtol=1e-5,
    )


def test_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    environment = _environment(tmp_path / "cache")
    refused = subprocess.run(
        _command(tiny_folder, out), env=environment, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert (out / "notes.txt").read_text() == "mine"
    nothing = subprocess.run(
        _command(tiny_folder, out, "--resume"), env=environment, capture_output=True, text=True
    )
    assert nothing.returncode == 2 and "Nothing to resume" in nothing.stderr


def test_same_seed_same_metrics(tiny_folder, tmp_path):
    import tlkit

    dataset = tlkit.data.from_directory(tiny_folder, validation_split=0.25, seed=1)
    config = tlkit.TrainConfig(
        backbone="mobilenet_v2",
        image_size=64,
        epochs=3,
        fine_tune_epochs=1,
        batch_size=4,
        deterministic=True,
    )
    first = tlkit.train_run(dataset, config, progress=False, log=lambda *_: None)
    second = tlkit.train_run(dataset, config, progress=False, log=lambda *_: None)
    assert first.metrics["accuracy"] == second.metrics["accuracy"]
    assert first.histories["fine_tune"]["loss"] == second.histories["fine_tune"]["loss"]
