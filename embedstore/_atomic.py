"""Safe outputs: atomic writes of files and folders, and the check that an output may be replaced.

Every file or folder embedstore writes goes through this module:

- :func:`atomic_file` and :func:`atomic_folder` build the output beside its final path under a
  unique temporary name (``.{name}.tmp-{host}-{pid}-{token}``), fsync it, and publish it in one
  rename. A folder that already exists is swapped with ``renameat2(RENAME_EXCHANGE)``, so a
  reader (or a process killed at any line) sees the old folder until the new one is complete,
  and the new one after. Temporary names left by killed processes are removed by the next write
  of the same output.
- :func:`check_replaceable` refuses to replace anything embedstore did not write: an existing
  output is replaced only when it carries embedstore's marker of the same kind
  (``embedstore.kind`` in a JSON manifest, a Parquet/HDF5 attribute, a PNG text chunk or an HTML
  meta tag), and never when it is, holds, or lies inside a store.
- A full disk or a file-size limit (ENOSPC, EDQUOT, EFBIG) becomes one
  :class:`~embedstore.errors.DiskFull` naming the path and the space needed; the temporary
  output is removed first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from embedstore.errors import BadInput, DiskFull, EmbedstoreError

LOG = logging.getLogger(__name__)

__all__ = [
    "DISK_FULL_ERRNOS",
    "KIND_KEY",
    "atomic_file",
    "atomic_folder",
    "check_replaceable",
    "disk_full_errno",
    "fsync_dir",
    "is_store",
    "read_kind",
    "remove_stale",
    "swap_in",
    "temp_dir",
]

# Same key as embedstore._schema.META_KIND (that module needs pyarrow; this one stays stdlib).
KIND_KEY = "embedstore.kind"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
# Folders whose JSON file names what the folder is: index manifest, checkpoint config, evaluation.
MARKER_FILES = ("manifest.json", "config.json", "evaluation.json", "predictions.json")

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")


# ------------------------------------------------------------------------------------ temporary names


def temp_path(dest: Path, tmp_dir: Path | None = None) -> Path:
    """A unique temporary name for ``dest`` (in ``tmp_dir``, default beside it), never listed by readers."""
    return (tmp_dir or dest.parent) / f".{dest.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(dest: Path, tmp_dir: Path | None = None) -> None:
    """Remove temporary copies of ``dest`` left by killed processes of this host (never a live one's)."""
    folder = tmp_dir or dest.parent
    prefix = f".{dest.name}.tmp-"
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m["name"] != dest.name or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        LOG.info("removing %s, left by a killed run", entry.path)
        _remove(Path(entry.path))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ------------------------------------------------------------------------------------- disk faults


def disk_full_errno(e: BaseException) -> int | None:
    """The ENOSPC/EDQUOT/EFBIG errno behind ``e`` (or its causes), also when a library only put it in the text."""
    seen = 0
    err: BaseException | None = e
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return err.errno
        text = str(err)
        for code in DISK_FULL_ERRNOS:
            if os.strerror(code) in text or f"errno {code}]" in text or f"errno = {code}," in text:
                return code
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _free(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_full(dest: Path, code: int, needed: int) -> DiskFull:
    """The one-line :class:`DiskFull` for ``dest``; ``needed`` is the estimated size of the output."""
    needed = max(int(needed), 1)
    if code == errno.EFBIG:
        msg = (
            f"{dest}: file too large for this process's file-size limit (needs about {_human(needed)}); "
            "raise the limit (ulimit -f) or choose another output folder, then rerun"
        )
        return DiskFull(msg)
    free = _free(dest.parent if dest.parent.exists() else Path(dest.anchor or "."))
    more = needed - free if free is not None and free < needed else needed
    what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on the device"
    msg = f"{dest}: {what} (needs about {_human(more)} more); free space or choose another output folder, then rerun"
    return DiskFull(msg)


def _check_size_limit(dest: Path, size_hint: int) -> None:
    """Fail before writing when the output is known to exceed this process's file-size limit."""
    import resource  # POSIX only, like the rest of the store's locking

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and size_hint > soft:
        raise disk_full(dest, errno.EFBIG, size_hint)


def _translate(e: BaseException, dest: Path, written: int, size_hint: int) -> Exception | None:
    """The embedstore error a failed write of ``dest`` should raise instead of ``e``, or None."""
    if isinstance(e, EmbedstoreError) or not isinstance(e, Exception):
        return None
    code = disk_full_errno(e)
    if code is not None:
        return disk_full(dest, code, max(written, size_hint))
    # Only a refusal to write where the output goes; a permission error on some input stays as it is.
    where = getattr(e, "filename", None)
    if (
        isinstance(e, OSError)
        and e.errno in _NO_ACCESS_ERRNOS
        and (where is None or str(where).startswith(str(dest.parent)))
    ):
        msg = f"{dest}: cannot write here ({e.strerror}); fix the folder's permissions or choose another output path"
        return BadInput(msg)
    return None


# -------------------------------------------------------------------------------- atomic publishing


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def _follow_umask(path: Path) -> None:
    """Give what is about to be published the modes of a plain file or folder under the umask.

    Some writers create private files (safetensors writes 0600), which a lab's shared group
    could then not read; published outputs follow the user's umask like any file they make.
    """
    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False when the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest`` in one step; an old folder at ``dest`` ends up at ``src`` (caller removes it).

    A file replaces a file with ``os.replace``. A folder replaces an existing one with
    ``RENAME_EXCHANGE``, or, where the file system lacks it, by renaming the old one aside first
    (a short window without ``dest``, never a mix of old and new).
    """
    if not src.is_dir() or not dest.exists():
        src.replace(dest)
        return
    if _exchange(src, dest):
        return
    aside = temp_path(dest)
    dest.rename(aside)
    src.rename(dest)
    aside.rename(src)


@contextlib.contextmanager
def atomic_file(dest: str | Path, *, tmp_dir: str | Path | None = None, size_hint: int = 0) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes ``dest`` in one rename.

    Parameters
    ----------
    dest
        Final path (its folder is created).
    tmp_dir
        Folder on the same file system for the temporary file (default: ``dest``'s folder).
    size_hint
        Expected size in bytes, for the message when the disk is full.

    Raises
    ------
    DiskFull
        The disk or a file-size limit ran out; the temporary file is gone, ``dest`` untouched.
    BadInput
        The folder is not writable.
    """
    dest = Path(dest)
    tmp_folder = Path(tmp_dir) if tmp_dir is not None else dest.parent
    tmp = temp_path(dest, tmp_folder)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp_folder.mkdir(parents=True, exist_ok=True)
        remove_stale(dest, tmp_folder)
        _check_size_limit(dest, size_hint)
        yield tmp
        _follow_umask(tmp)
        _fsync_file(tmp)
        tmp.replace(dest)
        fsync_dir(dest.parent)
    except BaseException as e:
        written = _size(tmp)
        _remove(tmp)
        err = _translate(e, dest, written, size_hint)
        if err is not None:
            raise err from e
        raise


@contextlib.contextmanager
def temp_dir(dest: str | Path, *, size_hint: int = 0, shown_as: str | Path | None = None) -> Iterator[Path]:
    """A unique temporary folder beside ``dest``, removed when the block ends (also on errors).

    Disk-full and permission errors inside the block are translated as in :func:`atomic_file`;
    messages name ``shown_as`` (default ``dest``) instead of the temporary folder.
    """
    dest = Path(dest)
    shown = Path(shown_as) if shown_as is not None else dest
    tmp = temp_path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dest)
        tmp.mkdir()
        yield tmp
    except BaseException as e:
        written = _size(tmp)
        _remove(tmp)
        if isinstance(e, DiskFull) and str(tmp) in str(e):  # a file inside: name where it was going
            raise DiskFull(str(e).replace(str(tmp), str(shown))) from e
        err = _translate(e, shown, written, size_hint)
        if err is not None:
            raise err from e
        raise
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_folder(dest: str | Path, *, size_hint: int = 0) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``dest`` in one atomic swap.

    Until the swap an existing ``dest`` stays complete and loadable; after it, the new folder is
    in place and the old copy is removed. Check the existing ``dest`` with
    :func:`check_replaceable` first: this function replaces whatever is there.

    Parameters
    ----------
    dest
        Final folder.
    size_hint
        Expected size in bytes, for the message when the disk is full.
    """
    dest = Path(dest)
    with temp_dir(dest, size_hint=size_hint) as tmp:
        yield tmp
        _follow_umask(tmp)
        _fsync_tree(tmp)
        swap_in(tmp, dest)  # the old folder, if any, is now at tmp and goes with it
        fsync_dir(dest.parent)


# ------------------------------------------------------------------------------ what a path holds


def _json_kind(path: Path) -> str | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = doc.get(KIND_KEY) if isinstance(doc, dict) else None
    return kind if isinstance(kind, str) else None


def _png_kind(path: Path) -> str | None:
    """The ``embedstore.kind`` tEXt chunk of a PNG (read chunk by chunk, stdlib only)."""
    try:
        with path.open("rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, ctype = struct.unpack(">I4s", head)
                if ctype == b"tEXt" and length < 1 << 16:
                    key, _, value = f.read(length).partition(b"\x00")
                    if key.decode("latin-1") == KIND_KEY:
                        return value.decode("latin-1")
                    f.seek(4, os.SEEK_CUR)
                elif ctype == b"IEND":
                    return None
                else:
                    f.seek(length + 4, os.SEEK_CUR)
    except OSError:
        return None


_META = re.compile(rb"<meta name=['\"]embedstore\.kind['\"] content=['\"]([^'\"]*)['\"]")


def _html_kind(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            m = _META.search(f.read(4096))
    except OSError:
        return None
    return m.group(1).decode() if m else None


def read_kind(path: Path, reader: Callable[[Path], str | None] | None = None) -> str | None:
    """The ``embedstore.kind`` an existing output carries, or None when embedstore did not write it.

    Folders are read through their marker file (``manifest.json``, ``config.json`` or
    ``evaluation.json``); ``.json``, ``.png`` and ``.html`` files through their own stamp; other
    files through ``reader`` (Parquet and HDF5 need their libraries).
    """
    if path.is_dir():
        for name in MARKER_FILES:
            if (path / name).is_file():
                kind = _json_kind(path / name)
                if kind is not None:
                    return kind
        return None
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _json_kind(path)
    if suffix == ".png":
        return _png_kind(path)
    if suffix in (".html", ".htm"):
        return _html_kind(path)
    if reader is not None:
        try:
            return reader(path)
        except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
            return None
    return None


# Folders only a store has: a crash-safe staging area, per-slide locks, Hive partitions.
_STORE_ONLY = ("_staging", "_locks")
_STORE_TABLES = {"embeddings": "encoder=", "spots": "cohort=", "expression": "cohort="}


def is_store(path: Path) -> bool:
    """True when ``path`` is an embedstore store folder (recognised by its layout)."""
    try:
        if not path.is_dir():
            return False
        if any((path / name).is_dir() for name in _STORE_ONLY):
            return True
        for table, prefix in _STORE_TABLES.items():
            if (path / table).is_dir() and any(e.name.startswith(prefix) for e in os.scandir(path / table)):
                return True
    except OSError:
        return False
    return False


def _store_above(path: Path) -> Path | None:
    for parent in path.resolve().parents:
        if is_store(parent):
            return parent
    return None


def _store_within(path: Path, allowed: tuple[str, ...]) -> Path | None:
    """A store somewhere below ``path`` (not counting ``path/NAME`` for NAME in ``allowed``)."""
    for folder, dirs, _ in os.walk(path):
        here = Path(folder)
        keep = []
        for d in dirs:
            if is_store(here / d):
                if here == path and d in allowed:
                    continue
                return here / d
            keep.append(d)
        dirs[:] = keep
    return None


def check_replaceable(
    path: str | Path,
    kind: str,
    *,
    what: str,
    option: str = "--out",
    overwrite: bool = True,
    folder: bool = False,
    reader: Callable[[Path], str | None] | None = None,
    stores_inside: tuple[str, ...] = (),
) -> bool:
    """Refuse (nothing touched) an output path that embedstore may not write to.

    An output may be written when it does not exist, is an empty folder, or carries
    embedstore's marker of ``kind`` (and ``overwrite`` allows it). It may never be a store, lie
    inside a store, or hold a store (except the subfolders named in ``stores_inside``).

    Parameters
    ----------
    path
        The output file or folder.
    kind
        The ``embedstore.kind`` it must carry to be replaced.
    what
        What the output is, for messages (e.g. ``"exemplar index"``).
    option
        The option or argument that names it, for messages (e.g. ``"--out"``).
    overwrite
        Replace an output of the same kind (else refuse it too).
    folder
        The output is a folder (a file there is refused).
    reader
        Reads the kind of a file type this module cannot parse (see :func:`read_kind`).
    stores_inside
        Names of subfolders that may be stores (an evaluation folder's own ``store``).

    Returns
    -------
    True when the path exists and will be replaced.

    Raises
    ------
    BadInput
        Naming the path and what to do.
    """
    path = Path(path)
    store = _store_above(path)
    if store is not None:
        msg = f"{path}: inside the embedstore store {store}; write the {what} outside the store ({option})"
        raise BadInput(msg)
    if not path.exists() and not path.is_symlink():
        return False
    if path.is_dir() and not path.is_symlink():
        if is_store(path):
            msg = f"{path}: this is an embedstore store, not the {what} to write; choose another {option}"
            raise BadInput(msg)
        if not folder:
            msg = f"{path}: is a folder; {option} names the {what} file to write, give a file path"
            raise BadInput(msg)
        try:
            empty = not any(os.scandir(path))
        except OSError as e:
            msg = f"{path}: cannot be read ({e.strerror}); fix its permissions or choose another {option}"
            raise BadInput(msg) from e
        if empty:
            return False
    elif folder:
        msg = f"{path}: exists and is not a folder; {option} names the {what} folder, choose another path"
        raise BadInput(msg)
    found = read_kind(path, reader)
    if found != kind:
        what_is = "folder" if path.is_dir() else "file"
        msg = (
            f"{path}: exists and is not an embedstore {what} (a {what_is} embedstore did not write, "
            f"so it is left alone); choose another {option} or move it away yourself"
        )
        raise BadInput(msg)
    if path.is_dir():
        inner = _store_within(path, stores_inside)
        if inner is not None:
            msg = f"{path}: holds the embedstore store {inner}; move the store out or choose another {option}"
            raise BadInput(msg)
    if not overwrite:
        msg = f"{path}: already exists; pass overwrite=True (--overwrite) to replace it, or choose another {option}"
        raise BadInput(msg)
    return True
