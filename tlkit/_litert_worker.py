"""`python -m tlkit._litert_worker MODEL.keras SIZE OUT.tflite EXPECTED.npy`: one conversion.

`tlkit.litert.convert_in_subprocess` runs this in a fresh Python process, so
the TensorFlow converter's memory and that of the first eager Keras call are
freed with that process instead of adding to the caller's peak resident memory.
The model is loaded with `safe_mode=True` (no code from the file runs);
importing `tlkit` (the package, run first by `-m`) registers tlkit's own
layers. It writes, each atomically, the flatbuffer and the Keras model's
outputs on `tlkit.litert.check_input`, against which the caller checks the
flatbuffer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np

from tlkit._io import atomic_path
from tlkit.litert import check_input, convert


def main(argv: list[str]) -> int:
    """Converts the saved model `argv[0]` at size `argv[1]`, writes `argv[2]` and `argv[3]`.

    Args:
        argv: `[model_path, image_size, output_path, expected_path]`.

    Returns:
        0 on success, 2 on a wrong command line.
    """
    if len(argv) != 4 or not argv[1].isdigit():
        print(
            "usage: python -m tlkit._litert_worker MODEL.keras IMAGE_SIZE OUT.tflite "
            f"EXPECTED.npy. Received: {argv}",
            file=sys.stderr,
        )
        return 2
    model_path, image_size, output_path, expected_path = argv
    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    probe = check_input(int(image_size), model.input_shape[-1])
    expected = keras.ops.convert_to_numpy(model(probe, training=False)).astype(np.float32)
    content = convert(model, int(image_size))
    with atomic_path(Path(output_path)) as temporary:
        temporary.write_bytes(content)
    with atomic_path(Path(expected_path)) as temporary:
        np.save(temporary, expected)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
