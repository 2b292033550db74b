"""Reliability (#15 J): MultiWorkerMirroredStrategy with two real worker processes.

Two `train_run` processes on this machine, each told its role by `TF_CONFIG`
(127.0.0.1, free ports), one CPU replica each and per-replica batch 4, are
compared with a one-worker run with the same global batch (8) and learning
rates; then a worker is killed with SIGKILL after its first fine-tuning epoch
and both are restarted with `resume=True` from their checkpoints. Run for
real, this first showed that `multi_worker` could not train at all: Keras 3
passes `MultiWorkerMirroredStrategy.reduce` values it refuses (see
`tlkit.distribute._MultiWorkerMirroredStrategy`). Every process is bounded by
a timeout and killed past it, so a hanging collective cannot hang the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TIMEOUT_S = 240

WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    mode, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
    from tlkit.distribute import get_strategy
    # The strategy first: MultiWorkerMirroredStrategy must exist before other TF ops.
    strategy = get_strategy("multi_worker") if mode == "multi" else None
    import tlkit
    from tlkit.data import ImageDataset, ImageSplit

    rng = np.random.default_rng(0)
    images = rng.integers(0, 100, (48, 40, 40, 3), dtype=np.uint8)
    labels = np.arange(48) % 2
    images[labels == 1, :, :, 2] = rng.integers(150, 256, (24, 40, 40), dtype=np.uint8)
    names = ["dark", "blue"]
    dataset = ImageDataset(
        "toy", names, ImageSplit("train", names, labels[:32], images=images[:32]),
        ImageSplit("validation", names, labels[32:], images=images[32:]),
    )
    # Two workers x batch 4 = global batch 8, learning rates scaled by 2 by train_run;
    # the one-worker run gets batch 8 and the doubled rates directly.
    scale, batch = (1, 4) if mode == "multi" else (2, 8)
    config = tlkit.TrainConfig(
        backbone="mobilenet_v2", image_size=48, epochs=3, fine_tune_epochs=2,
        batch_size=batch, head_batch_size=2 * batch, learning_rate=1e-3 * scale,
        fine_tune_learning_rate=1e-5 * scale, deterministic=True, augmentation="none",
        dropout_rate=0.0,
    )
    result = tlkit.train_run(dataset, config, out=out, resume=resume, progress=False,
                             log=lambda *_: None, strategy=strategy)
    print(json.dumps({
        "head_loss": result.histories["head"]["loss"],
        "fine_tune_loss": result.histories["fine_tune"]["loss"],
        "replicas": result.metrics["distribution"]["replicas"],
        "global_batch": result.metrics["distribution"]["global_batch_size"],
        "resumed": result.metrics["resumed"],
        "accuracy": result.metrics["accuracy"],
    }))
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(tmp_path, tf_config=None):
    environment = {
        **os.environ,
        "TLKIT_CACHE_DIR": str(tmp_path / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
    }
    environment.pop("TF_CONFIG", None)
    if tf_config is not None:
        environment["TF_CONFIG"] = json.dumps(tf_config)
    return environment


def _finish(process):
    """(return code, stdout, stderr) of a process, killing it past the timeout."""
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        return None, stdout, stderr
    return process.returncode, stdout, stderr


def _start_workers(tmp_path, name, resume=False):
    """Two worker processes of one cluster, each writing `tmp_path/name<index>`."""
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                "multi",
                str(tmp_path / f"{name}{index}"),
                "resume" if resume else "fresh",
            ],
            env=_environment(
                tmp_path, {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]


def _results(workers):
    finished = [_finish(worker) for worker in workers]
    for code, _, stderr in finished:
        assert code == 0, f"worker exit {code}: {stderr[-2000:]}"
    return [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in finished]


def _epochs_done(run) -> int:
    try:
        return json.loads((run / "checkpoints" / "state.json").read_text())["fine_tune_epochs_done"]
    except (OSError, ValueError, KeyError):
        return -1


def test_two_workers_match_one_worker_and_a_killed_worker_resumes(tmp_path):
    multi = _results(_start_workers(tmp_path, "worker"))
    single = subprocess.run(
        [sys.executable, "-c", WORKER, "single", str(tmp_path / "single"), "fresh"],
        env=_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])

    assert [run["replicas"] for run in multi] == [2, 2] and one["replicas"] == 1
    assert [run["global_batch"] for run in multi] == [8, 8] and one["global_batch"] == 8
    # The workers train one model in step: the same losses on both.
    for key in ("head_loss", "fine_tune_loss"):
        np.testing.assert_allclose(multi[0][key], multi[1][key], rtol=1e-6)
    # Sharded input meets the examples in another order than one worker: close, not
    # equal (the same 6 % as the mirrored test in test_distribute.py).
    for key in ("head_loss", "fine_tune_loss"):
        difference = np.abs(np.subtract(multi[0][key], one[key])).max()
        assert difference <= 0.06 * max(one[key]), (key, difference)

    # Kill worker 1 with SIGKILL once both have checkpointed the first fine-tuning epoch.
    workers = _start_workers(tmp_path, "killed")
    runs = [tmp_path / "killed0", tmp_path / "killed1"]
    deadline = time.monotonic() + TIMEOUT_S
    while min(_epochs_done(run) for run in runs) < 1:
        assert all(worker.poll() is None for worker in workers), "a worker ended early"
        assert time.monotonic() < deadline, "no checkpoint within the timeout"
        time.sleep(0.1)
    workers[1].send_signal(signal.SIGKILL)
    # Worker 0 cannot go on alone (its next collective waits for worker 1): the job is
    # restarted as a whole, as with any MultiWorkerMirroredStrategy job.
    workers[0].kill()
    for worker in workers:
        worker.communicate(timeout=60)
    done = [_epochs_done(run) for run in runs]
    assert done[0] == done[1] == 1, done  # Killed in the second epoch, before its checkpoint.
    assert not (runs[1] / "model.keras").exists()

    resumed = _results(_start_workers(tmp_path, "killed", resume=True))
    assert all(run["resumed"] for run in resumed)
    # The same result as the uninterrupted two-worker run.
    for key in ("head_loss", "fine_tune_loss"):
        np.testing.assert_allclose(resumed[0][key], multi[0][key], rtol=1e-4, atol=1e-6)
    assert resumed[0]["accuracy"] == multi[0]["accuracy"]
