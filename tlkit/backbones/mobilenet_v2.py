"""MobileNetV2 in torchvision's layout, for torchvision's ImageNet weights.

Reference: Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018 (https://arxiv.org/abs/1801.04381). torchvision pads
3x3 convolutions symmetrically and uses BatchNorm epsilon 1e-5, unlike
`keras.applications.MobileNetV2`; this layout matches the checkpoint.
"""

from __future__ import annotations

from tlkit.backbones._inverted_residual import NetworkConfig, expand_stages

# (expansion, filters, repeats, first stride, kernel): torchvision's table.
CONFIG = NetworkConfig(
    stem_filters=32,
    blocks=expand_stages(
        [
            (1, 16, 1, 1, 3),
            (6, 24, 2, 2, 3),
            (6, 32, 3, 2, 3),
            (6, 64, 4, 2, 3),
            (6, 96, 3, 1, 3),
            (6, 160, 3, 2, 3),
            (6, 320, 1, 1, 3),
        ]
    ),
    head_filters=1280,
    padding="symmetric",
    batch_norm_epsilon=1e-5,
    dropout_rate=0.2,
)


def state_dict_mapping(config: NetworkConfig = CONFIG):
    """(Keras layer, torchvision module) pairs for `assign_state_dict`."""
    mapping = [("stem_conv", "features.0.0"), ("stem_bn", "features.0.1")]
    for index, block in enumerate(config.blocks, start=1):
        prefix = f"features.{index}.conv"
        if block.expansion == 1:
            parts = [("depthwise", "0.0", "0.1"), ("project", "1", "2")]
        else:
            parts = [("expand", "0.0", "0.1"), ("depthwise", "1.0", "1.1"), ("project", "2", "3")]
        for part, conv, norm in parts:
            mapping.append((f"block{index}_{part}_conv", f"{prefix}.{conv}"))
            mapping.append((f"block{index}_{part}_bn", f"{prefix}.{norm}"))
    head = len(config.blocks) + 1
    mapping += [("head_conv", f"features.{head}.0"), ("head_bn", f"features.{head}.1")]
    mapping.append(("predictions", "classifier.1"))
    return mapping
