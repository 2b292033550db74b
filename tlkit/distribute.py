"""Choosing a `tf.distribute` strategy, and scaling batch size and learning rate with it.

Keras 3 on the TensorFlow backend trains under any `tf.distribute` strategy
when the model is built and compiled inside `strategy.scope()`. The batch size
tlkit takes is per replica; the global batch is that times the number of
replicas, and the learning rate grows linearly with it (Goyal et al. 2017,
https://arxiv.org/abs/1706.02677).
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

STRATEGIES = ("none", "mirrored", "multi_worker", "tpu")


def get_strategy(name: str | None = "none") -> tf.distribute.Strategy | None:
    """A `tf.distribute` strategy by name.

    Args:
        name: `"none"` (the default strategy, one device), `"mirrored"` (all
            local GPUs, or the local CPU devices), `"multi_worker"` (several
            machines, from the `TF_CONFIG` environment variable) or `"tpu"`
            (Colab / Cloud TPU). Defaults to `"none"`.

    Returns:
        The strategy, or None for `"none"`.

    Raises:
        ValueError: For an unknown name, or `"tpu"` where no TPU is found.
    """
    if name in (None, "none"):
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return _MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.NotFoundError) as error:
            raise ValueError(
                f"No TPU found ({error}). In Colab choose Runtime > Change runtime type > TPU. "
                "Received: strategy='tpu'"
            ) from error
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy. Expected one of {STRATEGIES}. Received: strategy={name!r}")


def num_replicas(strategy: tf.distribute.Strategy | None) -> int:
    """How many replicas train in step (1 without a strategy)."""
    return strategy.num_replicas_in_sync if strategy is not None else 1


def scope(strategy: tf.distribute.Strategy | None):
    """`strategy.scope()`, or a no-op context without a strategy."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def scale_for_replicas(
    batch_size: int, learning_rate: float, strategy: tf.distribute.Strategy | None
) -> tuple[int, float]:
    """The global batch size and the linearly scaled learning rate.

    Args:
        batch_size: Batch size per replica.
        learning_rate: Learning rate for one replica at that batch size.
        strategy: The strategy, or None.

    Returns:
        (global batch size, learning rate) for `num_replicas(strategy)` replicas.
    """
    replicas = num_replicas(strategy)
    return batch_size * replicas, learning_rate * replicas


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3 passes it.

    With more than one worker, Keras 3 (checked on 3.15.1) makes two calls
    that `MultiWorkerMirroredStrategy.reduce` refuses, so `fit` fails
    (found by `tests/test_reliability_multi_worker.py`):

    - `reduce("MEAN", (inputs, labels), axis=None)` on the first batch, to
      build the model symbolically: the collective ops take one value, not a
      tuple ("Attempt to convert a value (PerReplica...) to a Tensor").
    - `reduce("MEAN", metric, axis=0)` on every step's scalar metrics:
      "Invalid reduction dimension 0 for input with 0 dimensions".

    This reduces each element of a structure on its own, and a scalar across
    replicas (axis None, the only mean a scalar has); every other call is
    passed on unchanged.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def reduce_one(element):
            local = self.experimental_local_results(element)[0]
            scalar = getattr(getattr(local, "shape", None), "rank", None) == 0
            return parent.reduce(reduce_op, element, None if scalar else axis)

        return tf.nest.map_structure(reduce_one, value)
