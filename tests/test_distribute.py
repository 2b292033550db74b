"""Training under tf.distribute matches one device with the same global batch."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tlkit.distribute import get_strategy, num_replicas, scale_for_replicas

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    import tlkit
    from tlkit.data import ImageDataset, ImageSplit

    rng = np.random.default_rng(0)
    images = rng.integers(0, 100, (48, 40, 40, 3), dtype=np.uint8)
    labels = np.arange(48) % 2
    images[labels == 1, :, :, 2] = rng.integers(150, 256, (24, 40, 40), dtype=np.uint8)
    names = ["dark", "blue"]
    train = ImageSplit("train", names, labels[:32], images=images[:32])
    validation = ImageSplit("validation", names, labels[32:], images=images[32:])
    dataset = ImageDataset("toy", names, train, validation)

    def run(strategy, batch, head_batch, scale):
        config = tlkit.TrainConfig(
            backbone="mobilenet_v2", image_size=48, epochs=3, fine_tune_epochs=1,
            batch_size=batch, head_batch_size=head_batch, learning_rate=1e-3 * scale,
            fine_tune_learning_rate=1e-5 * scale, deterministic=True, augmentation="none",
            dropout_rate=0.0,
        )
        result = tlkit.train_run(dataset, config, progress=False, log=lambda *_: None,
                                 strategy=strategy)
        return {
            "head_loss": result.histories["head"]["loss"],
            "fine_tune_loss": result.histories["fine_tune"]["loss"],
            "accuracy": result.metrics["accuracy"],
            "replicas": result.metrics["distribution"]["replicas"],
            "global_batch": result.metrics["distribution"]["global_batch_size"],
        }

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(json.dumps({
        "mirrored": run(mirrored, batch=4, head_batch=8, scale=1),
        "single": run(None, batch=8, head_batch=16, scale=2),
        "unscaled": run(None, batch=8, head_batch=16, scale=1),
    }))
    """
)


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_one_device(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **__import__("os").environ,
            "TLKIT_CACHE_DIR": str(tmp_path),
            "TF_CPP_MIN_LOG_LEVEL": "3",
        },
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    mirrored, single, unscaled = results["mirrored"], results["single"], results["unscaled"]
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    assert mirrored["global_batch"] == single["global_batch"] == 8
    # The distributed input pipeline shuffles in another order than the local one, so the
    # runs agree within a tolerance, not bit for bit; a run whose learning rate was not
    # scaled for the global batch lands clearly further away.
    for key in ("head_loss", "fine_tune_loss"):
        close = np.abs(np.subtract(mirrored[key], single[key])).max()
        far = np.abs(np.subtract(mirrored[key], unscaled[key])).max()
        assert close <= 0.06 * max(single[key]), (key, close)
        assert far > 3 * close, (key, close, far)
    assert mirrored["accuracy"] == pytest.approx(single["accuracy"], abs=0.07)


def test_scaling_rules():
    assert scale_for_replicas(32, 1e-3, None) == (32, 1e-3)
    assert num_replicas(None) == 1
    assert get_strategy("none") is None
    with pytest.raises(ValueError, match="Expected one of"):
        get_strategy("nope")
