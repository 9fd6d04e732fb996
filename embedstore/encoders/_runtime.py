"""A built encoder at run time: its model on a device, the autocast precision, batches in and out.

torch is imported inside the methods, so that building the registry stays cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from embedstore.encoders._config import EncoderCfg
from embedstore.encoders._preprocess import make_transform
from embedstore.errors import BadInput


class Encoder:
    """A ready-to-run encoder: a model, its cfg, its transform and its fingerprint.

    Built only by :func:`embedstore.encoders.create_encoder`. ``model`` is the ``nn.Module`` whose
    call maps a transformed batch to ``(B, dim)`` (``None`` for weight-free encoders).
    """

    def __init__(self, cfg: EncoderCfg, model: Any, fingerprint: str, weights_source: str, channels_last: bool = False):
        self.cfg = cfg
        self.name = cfg.name
        self.dim = cfg.dim
        self.model = model
        self.fingerprint = fingerprint
        self.weights_source = weights_source
        self.channels_last = channels_last
        self.device = "cpu"
        self.precision = "fp32"
        self._amp_dtype: Any = None

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, dim={self.dim}, fingerprint={self.fingerprint}, device={self.device!r})"

    def transform(self) -> Callable[[np.ndarray], Any]:
        """Picklable per-batch preprocessing: uint8 ``(B, H, W, 3)`` -> model input."""
        return make_transform(self.cfg, channels_last=self.channels_last)

    def to(self, device: str = "cpu", precision: str = "auto") -> Encoder:
        """Move to ``device`` and choose the autocast precision.

        Parameters
        ----------
        device
            ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        precision
            ``"auto"`` (bf16 autocast on CUDA when supported, else fp16; fp32 on CPU, which has no
            fast bf16 here), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        """
        import torch

        if precision not in ("auto", "fp32", "fp16", "bf16"):
            msg = f"{self.name}: precision {precision!r} is not known; use auto, fp32, fp16 or bf16"
            raise BadInput(msg)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if precision == "auto":
            # without native bf16 (no AVX512-BF16 or AMX) CPU autocast runs about 3x slower, so CPU stays fp32
            cuda_amp = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp16"
            precision = cuda_amp if dev.type == "cuda" else "fp32"
        self._amp_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.precision = precision
        self.device = str(dev)
        if self.model is not None:
            self.model.to(dev)
            if self.channels_last:
                self.model.to(memory_format=torch.channels_last)
        return self

    def forward(self, batch: Any) -> np.ndarray:
        """Embed a transformed batch: ``(B, dim)`` float32 NumPy, under ``torch.inference_mode``."""
        import torch

        x = batch if isinstance(batch, torch.Tensor) else torch.as_tensor(batch)
        dev = torch.device(self.device)
        with torch.inference_mode():
            x = x.to(dev, non_blocking=True)
            if self._amp_dtype is not None:
                with torch.autocast(device_type=dev.type, dtype=self._amp_dtype):
                    out = self.model(x)
            else:
                out = self.model(x)
            out = out.float()
            if self.cfg.normalize:
                out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy()

    def encode(self, tiles_uint8: np.ndarray) -> np.ndarray:
        """``forward(transform()(tiles_uint8))``: uint8 ``(B, H, W, 3)`` -> ``(B, dim)`` float32."""
        return self.forward(self.transform()(tiles_uint8))

    def metadata(self) -> dict[str, Any]:
        """JSON-able description stored beside the embeddings: name, family, cfg, fingerprint."""
        return {
            "name": self.name,
            "family": self.cfg.family,
            "cfg": self.cfg.to_dict(),
            "fingerprint": self.fingerprint,
            "weights": self.weights_source,
        }


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded (``0`` when ``seed`` is ``None``), restoring it afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        yield
