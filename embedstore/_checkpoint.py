"""Checkpoint folders: ``config.json`` + ``model.safetensors``, never pickle.

Shared by the aligner and the learned aggregator. The JSON names what the folder holds
(``embedstore.kind``) and the schema version; a missing, corrupted or mismatched file is a
:class:`~embedstore.errors.BadInput` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedstore._atomic import atomic_folder, check_replaceable
from embedstore._optional import import_optional
from embedstore._schema import META_KIND, META_SCHEMA_VERSION, SCHEMA_VERSION
from embedstore.errors import BadInput

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_checkpoint(
    path: str | Path, kind: str, config: dict[str, Any], module: Any, *, overwrite: bool = True
) -> Path:
    """Write ``module``'s weights and ``config`` as the folder ``path``, both files swapped in together.

    Parameters
    ----------
    path
        Folder to write. An existing one is replaced only when it is a checkpoint of the same
        ``kind`` (or empty), in one atomic swap: a reader sees the old pair or the new pair.
    kind
        What the folder holds, e.g. ``"aligner"``; checked on load.
    config
        JSON-able settings needed to rebuild ``module``.
    module
        A torch ``nn.Module``.
    overwrite
        Replace an existing checkpoint of the same kind.

    Raises
    ------
    BadInput
        ``path`` holds something else (user files, a store), or exists and ``overwrite`` is False.
    DiskFull
        The disk ran out; nothing is left behind and an old checkpoint stays as it was.
    """
    st = import_optional("safetensors.torch", f"saving the {kind}")
    path = Path(path)
    check_replaceable(path, kind, what=f"{kind} checkpoint", option="path", overwrite=overwrite, folder=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in state.values())
    doc = {META_KIND: kind, META_SCHEMA_VERSION: SCHEMA_VERSION, "config": config}
    with atomic_folder(path, size_hint=size) as tmp:
        st.save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=1))
    return path


def read_checkpoint(folder: Path, kind: str, resave: str) -> tuple[dict[str, Any], dict[str, Any], Path, Path]:
    """Read a checkpoint folder written by :func:`save_checkpoint`.

    Parameters
    ----------
    folder
        The folder.
    kind
        The kind it must hold.
    resave
        What to tell the user to do with a bad folder, e.g. ``"re-save the aligner with save_aligner"``.

    Returns
    -------
    The config dict, the state dict of tensors, and the two file paths (for later messages).
    """
    st = import_optional("safetensors.torch", f"loading the {kind}")
    safetensor_error = import_optional("safetensors", f"loading the {kind}").SafetensorError
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            msg = f"{p}: missing; a {kind} folder holds {CONFIG_FILE} and {WEIGHTS_FILE} ({resave})"
            raise BadInput(msg)
    try:
        doc = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{cfg_path}: not valid JSON ({e}); {resave}"
        raise BadInput(msg) from e
    if not isinstance(doc, dict) or doc.get(META_KIND) != kind or "config" not in doc:
        msg = f"{cfg_path}: not an embedstore {kind} config; {resave}"
        raise BadInput(msg)
    if str(doc.get(META_SCHEMA_VERSION)) != SCHEMA_VERSION:
        msg = f"{cfg_path}: schema version {doc.get(META_SCHEMA_VERSION)}, this embedstore reads {SCHEMA_VERSION}; retrain or upgrade embedstore"
        raise BadInput(msg)
    try:
        state = st.load_file(str(w_path))
    except (safetensor_error, OSError) as e:
        msg = f"{w_path}: cannot be read as safetensors ({type(e).__name__}: {e}); the file is corrupted, {resave}"
        raise BadInput(msg) from e
    return doc["config"], state, cfg_path, w_path


def load_weights(module: Any, state: dict[str, Any], cfg_path: Path, w_path: Path) -> Any:
    """Load ``state`` into ``module`` strictly; a mismatch names both files."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = f"{w_path}: weights do not match {cfg_path} ({str(e).splitlines()[0]}); the two files come from different models"
        raise BadInput(msg) from e
    return module
