"""EfficientNet-Lite0, Lite1 and Lite2 in the layout of the converted TensorFlow checkpoints.

Reference: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML 2019 (https://arxiv.org/abs/1905.11946); the Lite
variants drop squeeze-excite, use ReLU6 and keep the stem and head fixed. The
PyTorch file (`_conv_stem`, `_blocks.N`, `_fc` names) was converted from the
TensorFlow checkpoint, so it keeps TensorFlow "same" padding and BatchNorm
epsilon 1e-3.

Lite1 and Lite2 scale depth by 1.1 and 1.2 (and Lite2 width by 1.1, channels
rounded to multiples of 8) but, unlike EfficientNet-B1/B2, keep the stem, the
head and the first and last stages' repeats fixed (`fix_head_stem` in the
TensorFlow builder); the layouts below match the PyPI files' tensor shapes.
"""

from __future__ import annotations

from tlkit.backbones._inverted_residual import NetworkConfig, expand_stages

# (expansion, filters, repeats, first stride, kernel): EfficientNet-B0 stages.
_LITE0_STAGES = [
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
]
# Depth 1.1 (Lite1) and 1.2 (Lite2) both round the middle stages' repeats up to these.
_SCALED_REPEATS = (1, 3, 3, 4, 4, 5, 1)
_LITE2_FILTERS = (16, 24, 48, 88, 120, 208, 352)  # Width 1.1, rounded to multiples of 8.


def _config(stages, dropout_rate: float) -> NetworkConfig:
    return NetworkConfig(
        stem_filters=32,
        blocks=expand_stages(stages),
        head_filters=1280,
        padding="same",
        batch_norm_epsilon=1e-3,
        dropout_rate=dropout_rate,
    )


CONFIG = _config(_LITE0_STAGES, dropout_rate=0.2)
LITE1_CONFIG = _config(
    [(e, f, r, s, k) for (e, f, _, s, k), r in zip(_LITE0_STAGES, _SCALED_REPEATS, strict=True)],
    dropout_rate=0.2,
)
LITE2_CONFIG = _config(
    [
        (e, f, r, s, k)
        for (e, _, _, s, k), r, f in zip(
            _LITE0_STAGES, _SCALED_REPEATS, _LITE2_FILTERS, strict=True
        )
    ],
    dropout_rate=0.3,
)


def state_dict_mapping(config: NetworkConfig = CONFIG):
    """(Keras layer, PyTorch module) pairs for `assign_state_dict`."""
    mapping = [("stem_conv", "_conv_stem"), ("stem_bn", "_bn0")]
    for index, block in enumerate(config.blocks, start=1):
        prefix = f"_blocks.{index - 1}"
        parts = [("depthwise", "_depthwise_conv", "_bn1"), ("project", "_project_conv", "_bn2")]
        if block.expansion != 1:
            parts.insert(0, ("expand", "_expand_conv", "_bn0"))
        for part, conv, norm in parts:
            mapping.append((f"block{index}_{part}_conv", f"{prefix}.{conv}"))
            mapping.append((f"block{index}_{part}_bn", f"{prefix}.{norm}"))
    mapping += [("head_conv", "_conv_head"), ("head_bn", "_bn1"), ("predictions", "_fc")]
    return mapping
