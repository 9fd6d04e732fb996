"""Encoder configuration, the Encoder wrapper, preprocessing, weight resolution and fingerprints.

Shared by every family module (``builtin``, ``timm_hub``, ``openclip``, ``imagenet``). torch and
huggingface_hub are imported inside functions so that ``import embedstore.encoders`` stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle  # only for its error type: weights are never unpickled into objects
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedstore import _schema
from embedstore._registry import Registry
from embedstore.errors import BadInput, MissingWeights

LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Fields of EncoderCfg that change the numbers an encoder produces; they feed the fingerprint.
PREPROCESSING_FIELDS = (
    "architecture",
    "input_size",
    "resize_size",
    "mean",
    "std",
    "interpolation",
    "target_mpp",
    "pooling",
    "normalize",
    "dim",
)

# File names looked for in a local folder, in this order, after the cfg's own file names.
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "checkpoint.pt",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class EncoderCfg:
    """What an encoder is: its weights' address, its preprocessing and its output.

    Parameters
    ----------
    name
        Registry name, e.g. ``"uni2-h"``.
    family
        Loader family: ``"builtin"``, ``"timm"``, ``"open_clip"``, ``"imagenet"``, ``"conch"``,
        ``"hf_transformers"``.
    architecture
        Architecture name in the family's library (timm model name, open_clip config name).
    hf_hub_id
        Hugging Face hub repository holding the weights, or ``None`` (built-in, test variants).
    filename
        Preferred weight file in that repository or folder.
    input_size
        Side of the square image the model sees, in pixels.
    resize_size
        Side the tile is resized to before a centre crop to ``input_size``; ``None`` means
        ``input_size`` (no crop).
    mean, std
        Per-channel normalisation of [0, 1] RGB.
    interpolation
        ``"bicubic"``, ``"bilinear"`` or ``"nearest"``, used when the tile size differs.
    target_mpp
        µm/px the model expects its tiles at (0.5 ≈ 20x).
    dim
        Embedding length.
    license, gated
        Licence of the weights; whether the hub repository requires accepting terms.
    pooling
        How tokens become one vector: ``"token"`` (class token, timm's default head),
        ``"cls_mean"`` (class token + mean of patch tokens), ``"avg"`` (global average),
        ``"pooled"`` (the library's own pooled output), ``"features"`` (hand-made features).
    normalize
        L2-normalise the output (CLIP-style models whose own ``encode_image`` does so).
    source
        Where default weights come from, for listings (``"hf-hub:org/repo"``, ``"package:..."``).
    requires
        Extra package needed beyond the core dependencies, or ``""``.
    seed
        Seed of the random initialisation of test variants (no weights).
    """

    name: str
    family: str
    architecture: str
    dim: int
    hf_hub_id: str | None = None
    filename: str = "model.safetensors"
    input_size: int = 224
    resize_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    target_mpp: float = 0.5
    license: str = "unknown"
    gated: bool = False
    pooling: str = "token"
    normalize: bool = False
    source: str = ""
    requires: str = ""
    seed: int | None = None

    def preprocessing(self) -> dict[str, Any]:
        """The fields that change the output, as a JSON-able dict (input of the fingerprint)."""
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in PREPROCESSING_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------------
# Registry

ENCODERS = Registry("encoder")


def register_encoder(
    name: str,
    *,
    cfg: EncoderCfg | None = None,
    family: str | None = None,
    dim: int | None = None,
    license: str | None = None,
    gated: bool | None = None,
    **meta: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering an encoder factory ``factory(weights=None, **kw) -> Encoder`` under ``name``.

    Parameters
    ----------
    name
        Registry name; registering it twice is an error.
    cfg
        The encoder's :class:`EncoderCfg`; family, dim, licence, gated and hub id are read from it.
    family, dim, license, gated
        Metadata for encoders without a cfg, or checks against the cfg.
    **meta
        Further metadata shown by :func:`list_encoders`.
    """
    given = {"family": family, "dim": dim, "license": license, "gated": gated}
    if cfg is not None:
        for key, value in given.items():
            if value is not None and value != getattr(cfg, key):
                msg = (
                    f"encoder {name!r}: {key}={value!r} disagrees with its cfg ({getattr(cfg, key)!r}); fix one of them"
                )
                raise BadInput(msg)
        if cfg.name != name:
            msg = f"encoder {name!r}: its cfg is named {cfg.name!r}; register it under the cfg's name"
            raise BadInput(msg)
        given = {"family": cfg.family, "dim": cfg.dim, "license": cfg.license, "gated": cfg.gated}
        meta = {
            "hf_hub_id": cfg.hf_hub_id,
            "weights": cfg.source,
            "target_mpp": cfg.target_mpp,
            "requires": cfg.requires,
            **meta,
        }
    missing = [k for k, v in given.items() if v is None]
    if missing:
        msg = f"encoder {name!r}: missing registry metadata {', '.join(missing)}; pass cfg= or these keywords"
        raise BadInput(msg)
    return ENCODERS.register(name, **given, **meta, cfg=cfg)


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _check_tiles(tiles: Any, who: str) -> np.ndarray:
    if not isinstance(tiles, np.ndarray) or tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        got = f"{type(tiles).__name__} {getattr(tiles, 'dtype', '')} {getattr(tiles, 'shape', '')}"
        msg = f"{who}: expected uint8 RGB tiles of shape (B, H, W, 3), got {got}; pass a batch from iter_tile_batches"
        raise BadInput(msg)
    return tiles


class TorchPreprocess:
    """Picklable per-batch transform: uint8 ``(B, H, W, 3)`` -> normalised float32 tensor ``(B, 3, S, S)``.

    Built by :func:`make_transform` from an :class:`EncoderCfg`; holds only plain values, so it
    can be sent to DataLoader workers or other processes.
    """

    def __init__(
        self,
        name: str,
        input_size: int,
        resize_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: str,
        channels_last: bool = False,
    ) -> None:
        self.name = name
        self.input_size = input_size
        self.resize_size = resize_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.interpolation = interpolation
        self.channels_last = channels_last

    def __call__(self, tiles: np.ndarray) -> Any:
        """Resize (when the tile size differs), centre-crop, scale to [0, 1], normalise."""
        import torch
        import torch.nn.functional as F

        tiles = _check_tiles(tiles, self.name)
        x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float()
        r = self.resize_size
        if x.shape[-2:] != (r, r):
            kw = {"antialias": True, "align_corners": False} if self.interpolation != "nearest" else {}
            x = F.interpolate(x, size=(r, r), mode=self.interpolation, **kw)
            # bicubic overshoots; clamp back to the pixel range before scaling
            x = x.clamp_(0.0, 255.0)
        if r != self.input_size:
            o = (r - self.input_size) // 2
            x = x[:, :, o : o + self.input_size, o : o + self.input_size]
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        x = (x - mean) / std
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


def make_transform(cfg: EncoderCfg, channels_last: bool = False) -> TorchPreprocess:
    """The eval transform of ``cfg``: the one place preprocessing is derived from a cfg.

    Parameters
    ----------
    cfg
        Encoder configuration (input size, resize size, mean, std, interpolation).
    channels_last
        Return tensors in channels-last memory format (faster for CNNs).
    """
    if cfg.interpolation not in _INTERPOLATIONS:
        msg = (
            f"{cfg.name}: interpolation {cfg.interpolation!r} is not supported; use one of {', '.join(_INTERPOLATIONS)}"
        )
        raise BadInput(msg)
    return TorchPreprocess(
        cfg.name,
        cfg.input_size,
        cfg.resize_size or cfg.input_size,
        cfg.mean,
        cfg.std,
        cfg.interpolation,
        channels_last,
    )


# ---------------------------------------------------------------------------------------------
# The encoder


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


# ---------------------------------------------------------------------------------------------
# Weights: resolution, hashing, loading

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, streamed in 1 MiB blocks (cached per path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def weights_fingerprint(cfg: EncoderCfg, weights_file: str | os.PathLike[str] | None) -> str:
    """Fingerprint of an encoder: hash of its weight bytes (or its seed) and its preprocessing."""
    # random test variants have no bytes: their architecture and seed identify them
    digest = f"random-init:{cfg.architecture}:seed={cfg.seed}" if weights_file is None else sha256_file(weights_file)
    return _schema.fingerprint(digest, cfg.preprocessing())


def looks_like_path(s: str) -> bool:
    """True for strings that look like a file system path rather than a name."""
    return s.startswith((".", "~")) or "/" in s or "\\" in s or s.lower().endswith(_WEIGHT_SUFFIXES)


def missing_weights(encoder: str, repo: str, reason: str, hint: str | None = None) -> MissingWeights:
    """The one-line error for weights that cannot be had; ``hint`` replaces the token/licence advice."""
    hint = hint or (
        f"set HF_TOKEN (or `hf auth login`) and accept the licence at https://huggingface.co/{repo}, "
        "or pass weights=local-dir:/path/to/folder"
    )
    return MissingWeights(f"{encoder}: weights for {repo} are not available ({reason}); {hint}")


def offline_hint(repo: str, gated: bool) -> str:
    """How to get a repository's weights onto a machine without internet (an HPC compute node)."""
    login = "`hf auth login`, accept its licence, then " if gated else ""
    return (
        f"on a machine with internet (e.g. a login node) {login}run `hf download {repo}` and set HF_HOME here to "
        "that machine's HF_HOME (shared or copied), or pass weights=local-dir:/path/to/folder "
        "(--weights local-dir:/path/to/folder)"
    )


# Seconds the reachability probe waits; HF_HUB_ETAG_TIMEOUT overrides it, as it does the hub client's own.
PROBE_TIMEOUT_S = 5.0


def hub_unreachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Why ``endpoint`` does not answer one HEAD request, or ``""`` when it answers.

    One request, no retries: any HTTP status counts as an answer, and so does a TLS error
    (something answered; certificates are the hub client's business).
    """
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            return ""
    except urllib.error.HTTPError:
        return ""
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return ""
        return str(getattr(e.reason, "strerror", None) or e.reason)
    except (OSError, http.client.HTTPException, ValueError) as e:  # read timeout, reset, bad status, bad URL
        return str(e) or type(e).__name__


def _offline_var() -> str:
    """``"HF_HUB_OFFLINE=1"`` (or TRANSFORMERS_OFFLINE) when the user put the hub client offline, else ``""``."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var, "").strip()
        if value.lower() in ("1", "true", "yes", "on"):
            return f"{var}={value}"
    return ""


def _probe_timeout() -> float:
    try:
        seconds = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT_S)
    except ValueError:
        return PROBE_TIMEOUT_S
    return seconds if 0 < seconds < float("inf") else PROBE_TIMEOUT_S


def _hub_download(cfg: EncoderCfg, repo: str, filenames: tuple[str, ...]) -> Path:
    """Fetch the first of ``filenames`` that ``repo`` has, through the hub cache.

    Unless the user set ``HF_HUB_OFFLINE``, one short probe of the hub comes first: the hub
    client retries every file name with back-off (half a minute of warnings on a compute node
    without internet), so an unreachable hub means "the cache only", decided once.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    offline_var = _offline_var()
    local_only = bool(offline_var)
    reason = "not found in the repository"
    hint = None
    if offline_var:
        reason = f"offline ({offline_var}) and not in the hub cache"
    else:
        why = hub_unreachable(constants.ENDPOINT, _probe_timeout())
        if why:
            LOG.info("%s: %s did not answer (%s); looking in the hub cache only", cfg.name, constants.ENDPOINT, why)
            local_only = True
            reason = f"the hub at {constants.ENDPOINT} is not reachable ({why}) and they are not in the hub cache"
            hint = offline_hint(repo, cfg.gated)
    for fn in filenames:
        try:
            # look the module attribute up at call time so tests can monkeypatch hf_hub_download
            path = huggingface_hub.hf_hub_download(repo, fn, local_files_only=local_only)
            return Path(path)
        except hf_errors.GatedRepoError:
            reason, hint = "gated repository and this account has no access", None
            break
        except hf_errors.RepositoryNotFoundError:
            reason, hint = "repository not found, or private and no token given", None
            break
        except hf_errors.LocalEntryNotFoundError:
            # not cached and the hub failed after the probe: another file name may still be cached, so go
            # on, but through the cache only, so that a lost connection costs one timeout, not six
            if not local_only:
                reason = "the hub stopped answering and they are not in the hub cache"
                hint = offline_hint(repo, cfg.gated)
            local_only = True
        except hf_errors.EntryNotFoundError:
            continue  # the repository has no such file: try the next name
        except (OSError, ValueError) as e:  # network errors, bad tokens
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'download failed'}"
            local_only = True
    raise missing_weights(cfg.name, repo, reason, hint)


def resolve_weights(cfg: EncoderCfg, weights: str | os.PathLike[str] | None) -> tuple[Path | None, str]:
    """Find the weight file for ``cfg``.

    Parameters
    ----------
    cfg
        Encoder configuration (hub id, preferred file name).
    weights
        ``None`` (the hub cache for ``cfg.hf_hub_id``; random init for test variants),
        ``"hf-hub:org/repo"``, ``"local-dir:/folder"`` or a weight file's path.

    Returns
    -------
    The weight file (``None`` for random init) and a short description of where it came from.
    """
    names = tuple(dict.fromkeys((cfg.filename, *WEIGHT_FILES)))
    if weights is None:
        if cfg.hf_hub_id is None:
            return None, f"random-init(seed={cfg.seed})"
        return _hub_download(cfg, cfg.hf_hub_id, names), f"hf-hub:{cfg.hf_hub_id}"
    w = os.fspath(weights)
    if w.startswith(("hf-hub:", "hf_hub:")):
        repo = w.split(":", 1)[1]
        return _hub_download(cfg, repo, names), f"hf-hub:{repo}"
    if w.startswith("local-dir:"):
        folder = Path(w.split(":", 1)[1]).expanduser()
        if not folder.is_dir():
            msg = f"{folder}: not a folder; pass weights=local-dir:/path/to/folder holding {' or '.join(WEIGHT_FILES[:3])}"
            raise MissingWeights(msg)
        for fn in names:
            if (folder / fn).is_file():
                return folder / fn, f"local-dir:{folder}"
        msg = f"{folder}: no weight file for {cfg.name} (looked for {', '.join(names)}); put the weights there or pass a file path"
        raise MissingWeights(msg)
    p = Path(w).expanduser()
    if p.is_file():
        return p, f"file:{p}"
    if looks_like_path(w):
        msg = (
            f"{w}: no such weight file; pass weights='local-dir:/path/to/folder' for a folder "
            "or weights='hf-hub:org/repo' for a hub repository"
        )
        raise MissingWeights(msg)
    msg = (
        f"{cfg.name}: weights={w!r} is not understood; pass None, 'hf-hub:org/repo', 'local-dir:/folder' or a file path"
    )
    raise BadInput(msg)


def load_state_dict(path: str | os.PathLike[str], prefix: str | None = None) -> dict[str, Any]:
    """Read a state dict with safetensors or ``torch.load(weights_only=True)``; never unpickle objects.

    Parameters
    ----------
    path
        ``.safetensors`` file, or a torch checkpoint (bare state dict, or nested under
        ``"state_dict"`` / ``"model"``).
    prefix
        Keep only keys under this prefix (e.g. ``"visual."``) and strip it, when any key has it.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            sd: Any = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        msg = f"{p}: cannot read weights ({type(e).__name__}); pass a safetensors or torch state-dict file"
        raise MissingWeights(msg) from e
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        msg = f"{p}: holds a {type(sd).__name__}, not a state dict; save model.state_dict()"
        raise MissingWeights(msg)
    # checkpoints saved from DistributedDataParallel carry "module." on every key
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    if prefix and any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_into(
    module: Any, state_dict: Mapping[str, Any], where: str, encoder: str, ignore: tuple[str, ...] = ()
) -> None:
    """Load ``state_dict`` into ``module``: every parameter must be there; extra keys under ``ignore`` are dropped.

    Parameters
    ----------
    module
        The ``nn.Module`` to fill.
    state_dict
        Tensors by key.
    where
        File the weights came from, for the message.
    encoder
        Encoder name, for the message.
    ignore
        Key prefixes that may be present and unused (classifier heads, text towers).
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith(ignore)} if ignore else dict(state_dict)
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        msg = f"{where}: weights do not fit {encoder} ({first[:200]}); pass weights for this architecture"
        raise BadInput(msg) from e
    if missing or unexpected:
        bad = ", ".join([*missing[:3], *unexpected[:3]])
        msg = (
            f"{where}: weights do not fit {encoder} ({len(missing)} missing, {len(unexpected)} unexpected keys: "
            f"{bad}); pass weights for this architecture"
        )
        raise BadInput(msg)


def seeded(seed: int | None) -> Any:
    """Context manager: run with torch's CPU RNG seeded, leaving the global RNG as it was."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def _ctx():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            yield

    return _ctx()
