"""Image datasets for transfer learning: folders, named datasets, `tf.data` pipelines.

Example:

>>> from tlkit import data
>>> flowers = data.load("tf_flowers")  # $TLKIT_DATA_DIR, the cache, or a download
>>> train = flowers.train.to_dataset(image_size=224, shuffle=True, seed=0)
>>> mine = data.from_directory("my_photos", image_size=224, validation_split=0.2)
"""

from tlkit.data.catalog import (
    DatasetNotFoundError,
    DetectionDataset,
    DetectionExample,
    UnsafeArchiveError,
    dataset_info,
    how_to_get,
    list_datasets,
    load,
    load_detection,
    resolve,
    resolve_offline,
    safe_extract,
)
from tlkit.data.dataset import DataReport, ImageDataset, ImageSplit
from tlkit.data.directory import from_directory
from tlkit.data.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    check_image,
    load_image,
)
from tlkit.data.tfds import from_tfds

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataReport",
    "DatasetNotFoundError",
    "DetectionDataset",
    "DetectionExample",
    "ImageDataset",
    "ImageDecodeError",
    "ImageSplit",
    "UnsafeArchiveError",
    "check_image",
    "dataset_info",
    "how_to_get",
    "from_directory",
    "from_tfds",
    "list_datasets",
    "load",
    "load_detection",
    "load_image",
    "resolve",
    "resolve_offline",
    "safe_extract",
]
