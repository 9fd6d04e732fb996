"""Where an encoder's weights come from, and reading them safely.

``resolve_weights`` turns ``None`` (the Hugging Face hub cache), ``"hf-hub:org/repo"``,
``"local-dir:/folder"`` or a file path into one weight file; an unreachable hub is probed once
and then only the cache is looked in. ``load_state_dict`` reads safetensors or
``torch.load(weights_only=True)``; nothing is ever unpickled into objects. torch and
huggingface_hub are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
import pickle  # only for its error type: weights are never unpickled into objects
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embedstore.encoders._config import EncoderCfg
from embedstore.errors import BadInput, MissingWeights

LOG = logging.getLogger(__name__)

# File names looked for in a local folder, in this order, after the cfg's own file names.
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "checkpoint.pt",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


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
    module: Any,
    state_dict: Mapping[str, Any],
    where: str,
    encoder: str,
    ignore: tuple[str, ...] = (),
    assign: bool = False,
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
    assign
        Make the state dict's tensors the module's own instead of copying them (a module built on
        the meta device); they are cast to the module's dtypes first, as a copy would cast them.
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith(ignore)} if ignore else dict(state_dict)
    if assign:
        own = module.state_dict(keep_vars=True)
        sd = {k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False, assign=assign)
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
