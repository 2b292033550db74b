"""tlkit.data.from_tfds and load("tf_flowers") on tiny tfds datasets written here (no network)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tlkit import data

tfds = pytest.importorskip("tensorflow_datasets")

FLOWER_CLASSES = ["dandelion", "daisy", "tulips", "sunflowers", "roses"]  # tfds's order


def _image(value: int) -> np.ndarray:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[..., value % 3] = 15 * (value + 1)
    return image


class TlkitTinyShapes(tfds.core.GeneratorBasedBuilder):
    """Two classes, 6 train and 4 test images of 8x8 pixels."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(names=["red", "blue"]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(4)}

    def _generate_examples(self, count):
        for index in range(count):
            yield index, {"image": _image(index), "label": index % 2}


class TlkitTinyFlowers(tfds.core.GeneratorBasedBuilder):
    """tf_flowers' features and class names, 3 images per class, one "train" split."""

    VERSION = tfds.core.Version("3.0.1")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(),
                    "label": tfds.features.ClassLabel(names=FLOWER_CLASSES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index in range(15):
            yield index, {"image": _image(index), "label": index % 5}


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("TLKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds_here"))
    monkeypatch.delenv("TLKIT_DATA_DIR", raising=False)
    return tmp_path


def test_from_tfds_keeps_the_tfds_splits_and_pixels(folders):
    tfds_dir = folders / "tfds"
    TlkitTinyShapes(data_dir=str(tfds_dir)).download_and_prepare()

    dataset = data.from_tfds("tlkit_tiny_shapes", data_dir=tfds_dir)

    assert dataset.class_names == ["blue", "red"]  # tlkit's sorted folder names
    assert (len(dataset.train), len(dataset.test), dataset.validation) == (6, 4, None)
    assert dataset.train.class_counts() == {"blue": 3, "red": 3}
    batch = next(iter(dataset.train.to_dataset(image_size=8, batch_size=6)))
    images = np.asarray(batch[0])
    # The exported PNGs decode to the exact generated pixels (lossless, no resizing).
    expected = {tuple(_image(index)[0, 0]) for index in range(6)}
    assert {tuple(image[0, 0].astype(np.uint8)) for image in images} == expected


def test_from_tfds_one_split_is_divided_with_a_seed(folders):
    tfds_dir = folders / "tfds"
    TlkitTinyShapes(data_dir=str(tfds_dir)).download_and_prepare()

    dataset = data.from_tfds(
        "tlkit_tiny_shapes", split="train", data_dir=tfds_dir, validation_split=0.34, test_split=0
    )
    assert len(dataset.train) + len(dataset.validation) == 6
    assert len(dataset.validation) == 2

    with pytest.raises(ValueError, match=r"no split 'validation'.*Received: split="):
        data.from_tfds("tlkit_tiny_shapes", split="validation", data_dir=tfds_dir)


def test_from_tfds_without_a_prepared_copy_says_how_to_get_it(folders):
    with pytest.raises(data.DatasetNotFoundError, match=r"tensorflow_datasets.load\('beans'\)"):
        data.from_tfds("beans", data_dir=folders / "empty")


def test_load_tf_flowers_resolves_an_existing_tfds_copy(folders, capsys):
    made = folders / "made"
    TlkitTinyFlowers(data_dir=str(made)).download_and_prepare()
    tfds_dir = folders / "tfds"
    # A prepared copy under tfds's own name for it: <data_dir>/tf_flowers/<version>/.
    shutil.copytree(made / "tlkit_tiny_flowers", tfds_dir / "tf_flowers")
    assert data.resolve_offline("tf_flowers") is None
    assert data.resolve_offline("tf_flowers", data_dir=tfds_dir) is not None

    flowers = data.load("tf_flowers", data_dir=tfds_dir, download=False)

    assert flowers.class_names == sorted(FLOWER_CLASSES)
    assert sum(len(split) for split in flowers.splits.values()) == 15
    assert "tensorflow-datasets copy" in capsys.readouterr().out
    # Exported once into the cache: the next load reads the folder, tfds copy or not.
    shutil.rmtree(tfds_dir)
    again = data.load("tf_flowers", download=False)
    assert again.train.fingerprint() == flowers.train.fingerprint()
