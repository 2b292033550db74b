"""The recipe search: chooses on validation only, within a budget, deterministically."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tlkit
from tlkit.cli import main
from tlkit.data import ImageDataset, ImageSplit
from tlkit.recipe_search import (
    candidate_sizes,
    native_image_size,
    search_recipe,
    train_with_search,
)

pytestmark = pytest.mark.usefixtures("tlkit_cache_dir")

SIZE = 48
# Tiny and quick: one backbone at the images' own size, a two-epoch head, no fine-tuning.
HEADS_ONLY = {"image_size": SIZE, "epochs": 2, "fine_tune_epochs": 0}


def _split(name, count, seed, labels=None):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3 if labels is None else labels
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])[labels]
    images = np.clip(colours[:, None, None, :] + rng.normal(0, 90, (count, SIZE, SIZE, 3)), 0, 255)
    return ImageSplit(name, ["red", "green", "blue"], labels, images=images.astype(np.uint8))


def _dataset(test_labels=None):
    return ImageDataset(
        "colours",
        ["red", "green", "blue"],
        _split("train", 18, 0),
        _split("validation", 12, 1),
        _split("test", 12, 2, test_labels),
    )


def _base():
    return tlkit.TrainConfig(backend="keras", deterministic=True, seed=5)


def _search(dataset, budget=600.0):
    return search_recipe(
        dataset,
        budget,
        base=_base(),
        fixed=HEADS_ONLY,
        backbones=("mobilenet_v2",),
        log=lambda line: None,
    )


@pytest.mark.slow
def test_the_test_split_never_changes_the_choice():
    plain = _search(_dataset())
    permuted_labels = np.random.default_rng(1).permutation(np.arange(12) % 3)
    permuted = _search(_dataset(permuted_labels))
    # Same seed, same candidates: the same scores (so deterministic) and the same winner.
    assert [c.row()["validation_score"] for c in plain.candidates] == [
        c.row()["validation_score"] for c in permuted.candidates
    ]
    assert plain.config == permuted.config
    stages = [c.stage for c in plain.candidates]
    assert stages[:2] == ["head", "regularisation"] and stages.count("views") == 2
    # The winner has the best validation score of all candidates tried.
    scores = [c.score for c in plain.candidates if c.score is not None]
    assert max(scores) == next(c.score for c in plain.candidates if c.config == plain.config)


def test_a_tiny_budget_runs_the_first_candidate_only():
    result = _search(_dataset(), budget=0.01)
    done = [c for c in result.candidates if c.status == "done"]
    assert len(done) == 1 and done[0] is result.candidates[0]
    assert all(c.status.startswith("skipped") for c in result.candidates[1:])
    assert len(result.candidates) > 1
    assert "did not fit the budget" in result.reason


def test_sizes_follow_the_images_native_size():
    assert native_image_size(_split("train", 6, 0)) == SIZE
    assert candidate_sizes("efficientnet_lite0", 28) == [224, 128]
    assert candidate_sizes("efficientnet_lite0", 180) == [224]
    assert candidate_sizes("efficientnet_lite0", 400) == [224, 288]


@pytest.mark.slow
def test_search_then_train_writes_the_record_to_metrics_json(tmp_path):
    lines = []
    result = train_with_search(
        _dataset(),
        300,
        base=_base(),
        fixed=HEADS_ONLY,
        out=tmp_path / "run",
        progress=False,
        log=lines.append,
    )
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["recipe_search"]
    assert record == json.loads(json.dumps(result.metrics["recipe_search"]))
    assert record["chosen"]["backbone"] == result.metrics["config"]["backbone"]
    assert record["used_s"] >= record["search_s"] > 0
    assert all({"validation_score", "seconds", "status"} <= set(c) for c in record["candidates"])
    assert any(line.startswith("candidate ") for line in "\n".join(lines).splitlines())
    assert any("Why:" in line for line in lines)
    assert result.metrics["evaluated_on"] == "test"


def test_cli_recipe_fast_and_recipe_flags_skip_the_search(tmp_path, capsys):
    folder = tmp_path / "images"
    from PIL import Image

    for index, name in enumerate(("red", "blue")):
        (folder / name).mkdir(parents=True)
        for number in range(8):
            pixels = np.full((32, 32, 3), 60, np.uint8)
            pixels[..., index * 2] = 200 + number
            Image.fromarray(pixels).save(folder / name / f"{number}.png")
    common = ["train", str(folder), "--epochs", "1", "--backend", "keras", "--no-progress"]
    for extra in (
        ["--recipe", "fast", "--backbone", "mobilenet_v2"],
        ["--backbone", "mobilenet_v2"],
    ):
        out = tmp_path / f"run-{len(extra)}"
        assert main([*common, *extra, "--image-size", "32", "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert "recipe_search" not in metrics
        assert metrics["config"]["backbone"] == "mobilenet_v2"
    assert "Recipe search" not in capsys.readouterr().out
