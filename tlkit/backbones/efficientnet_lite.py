"""EfficientNet-Lite0 in the layout of the converted TensorFlow checkpoint.

Reference: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML 2019 (https://arxiv.org/abs/1905.11946); the Lite
variants drop squeeze-excite, use ReLU6 and keep the stem and head fixed. The
PyTorch file (`_conv_stem`, `_blocks.N`, `_fc` names) was converted from the
TensorFlow checkpoint, so it keeps TensorFlow "same" padding and BatchNorm
epsilon 1e-3.
"""

from __future__ import annotations

from tlkit.backbones._inverted_residual import NetworkConfig, expand_stages

# (expansion, filters, repeats, first stride, kernel): EfficientNet-B0 stages.
CONFIG = NetworkConfig(
    stem_filters=32,
    blocks=expand_stages(
        [
            (1, 16, 1, 1, 3),
            (6, 24, 2, 2, 3),
            (6, 40, 2, 2, 5),
            (6, 80, 3, 2, 3),
            (6, 112, 3, 1, 5),
            (6, 192, 4, 2, 5),
            (6, 320, 1, 1, 3),
        ]
    ),
    head_filters=1280,
    padding="same",
    batch_norm_epsilon=1e-3,
    dropout_rate=0.2,
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
