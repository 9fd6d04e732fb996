"""Low-level file mechanics of the store: atomic Parquet writes, staging journals, OS locks, fast vector reads.

Nothing here knows the store layout; ``_store.py`` decides where files go.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore._atomic import atomic_file, disk_full, disk_full_errno
from embedstore._atomic import fsync_dir as fsync_dir  # used by the store's own renames
from embedstore._schema import Col
from embedstore.errors import BadInput

# Names become Hive path segments (key=value) and DuckDB glob patterns, so keep them to
# characters that need no URL-encoding and are not glob syntax.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+@ -]*$")

# Parquet writer settings of the embedding column, chosen by scripts/bench_storage.py:
# PLAIN float pages (no dictionary, no compression, no page statistics) in data-page v2,
# whose header gives the byte length of the levels, so the vector bytes of each page can
# be read straight into the output array (see read_vectors_into). Other columns keep
# dictionary + zstd + statistics (they are small and filtered on).
DATA_PAGE_SIZE = 1 << 20
ROW_GROUP_BYTES = 64 << 20


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it can be a path segment of the store, else raise :class:`BadInput`."""
    if not isinstance(value, str) or not _NAME.match(value) or value.endswith(" "):
        msg = (
            f"{value!r}: not a valid {what} for the store; use letters, digits and _ . : + @ - "
            "(no slashes, '=', '%', glob characters or leading dot)"
        )
        raise BadInput(msg)
    return value


def row_group_rows(dim: int) -> int:
    """Rows per row group: about 64 MiB of vectors, between 1,024 and 65,536 rows."""
    return int(min(65536, max(1024, ROW_GROUP_BYTES // max(1, 4 * dim))))


def _leaf_path(schema: pa.Schema, name: str) -> str:
    """Dotted Parquet path of the leaf under a (fixed-size) list column, e.g. ``embedding.list.element``."""
    field = schema.field(name)
    return f"{name}.list.{field.type.value_field.name}"


def write_options(schema: pa.Schema, vector_col: str | None = Col.EMBEDDING) -> dict[str, Any]:
    """Keyword arguments of ``pq.write_table`` for a table with one vector column."""
    names = [n for n in schema.names if n != vector_col]
    compression: dict[str, str] = dict.fromkeys(names, "zstd")
    # Page CRCs let `embedstore check` find pages zeroed or overwritten under an intact footer;
    # read_vectors_into skips the CRC field, so the fast path is unchanged.
    opts: dict[str, Any] = {"data_page_version": "2.0", "data_page_size": DATA_PAGE_SIZE, "write_page_checksum": True}
    if vector_col is not None and vector_col in schema.names:
        compression[_leaf_path(schema, vector_col)] = "none"
        opts["use_dictionary"] = [n for n in names if pa.types.is_string(schema.field(n).type)]
        opts["write_statistics"] = names
    opts["compression"] = compression
    return opts


def write_parquet_atomic(
    table: pa.Table, dest: Path, tmp_dir: Path | None = None, row_group_size: int | None = None, **options: Any
) -> Path:
    """Write ``table`` to ``dest`` so that a reader sees the whole file or none.

    The bytes go to a uniquely named temporary file (in ``tmp_dir``, default ``dest``'s
    folder), are fsynced, then ``os.replace``d onto ``dest`` and the folder is fsynced
    (:func:`embedstore._atomic.atomic_file`).

    Parameters
    ----------
    table
        Table to write; its schema metadata is kept.
    dest
        Final path.
    tmp_dir
        Folder on the same file system for the temporary file; put it outside the folders
        readers glob so that not even the temporary name is ever listed.
    row_group_size
        Rows per row group (pyarrow's default when ``None``).
    **options
        Passed to ``pyarrow.parquet.write_table``.

    Raises
    ------
    DiskFull
        The disk or the file-size limit ran out; no temporary file is left and ``dest`` is untouched.
    """
    dest = Path(dest)
    with atomic_file(dest, tmp_dir=tmp_dir, size_hint=table.nbytes) as tmp, tmp.open("wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size, **options)
    return dest


# --- staging journals -------------------------------------------------------------------
#
# A slide's batches are staged in an Arrow IPC stream, one record batch per append: writing
# a batch to the kernel costs a copy, where a durable Parquet file per batch cost two fsyncs,
# a footer and a re-read at commit.

JOURNAL_SYNC_SECONDS = 5.0
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_META_BOOT = b"embedstore.boot_id"  # the boot that wrote a journal: its unsynced batches are whole in that boot only
_META_SYNCED = b"embedstore.synced"  # marker batch: every batch before it was on disk when it was written
_READ_ERRORS = (OSError, pa.ArrowException)


def boot_id() -> str | None:
    """This boot of the machine (Linux), or ``None`` where it cannot be told."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


class Journal:
    """An append-only Arrow IPC stream of record batches, whole batch by batch across a SIGKILL.

    :meth:`append` hands each batch to the kernel before it returns, so a killed process
    loses at most the batch being written (a torn last message, which :func:`read_journal`
    drops). Against a crash of the machine the file is fsynced when ``sync_seconds`` have
    passed since the last sync, followed by a marker batch; after a reboot
    :func:`read_journal` keeps only the batches a marker vouches for, so a power cut loses
    at most the last ``sync_seconds`` of batches. Where the boot cannot be told (not Linux),
    every batch is fsynced.
    """

    def __init__(self, path: Path, schema: pa.Schema, sync_seconds: float = JOURNAL_SYNC_SECONDS) -> None:
        boot = boot_id()
        self.path = Path(path)
        self._sync_seconds = sync_seconds if boot is not None else 0.0
        self._marker = pa.RecordBatch.from_arrays([pa.array([], f.type) for f in schema], schema=schema)
        self._file = pa.OSFile(str(self.path), "wb")
        meta = {**(schema.metadata or {}), _META_BOOT: (boot or "").encode()}
        self._writer = pa.ipc.new_stream(self._file, schema.with_metadata(meta))
        self._synced_at = time.monotonic()
        self._dir_synced = False

    def append(self, table: pa.Table) -> None:
        """Write ``table`` (of the journal's schema) as one message; fsync when the last sync is old.

        Raises :class:`~embedstore.errors.DiskFull` when the disk is full; the journal then ends
        in a torn message, so write later batches to a new journal.
        """
        try:
            self._writer.write_table(table)
            if time.monotonic() - self._synced_at >= self._sync_seconds:
                self.sync()
        except OSError as e:
            code = disk_full_errno(e)
            if code is None:
                raise
            raise disk_full(self.path, code, table.nbytes) from e

    def sync(self) -> None:
        """Put every batch written so far on disk and mark it so in the journal."""
        os.fsync(self._file.fileno())
        if not self._dir_synced:
            fsync_dir(self.path.parent)
            self._dir_synced = True
        self._writer.write_batch(self._marker, custom_metadata={_META_SYNCED: b"1"})
        self._synced_at = time.monotonic()

    def close(self) -> None:
        """Close the file (its batches stay readable; nothing is fsynced)."""
        try:
            self._writer.close()
        finally:
            self._file.close()


def read_journal(path: Path) -> pa.Table:
    """The whole batches of a :class:`Journal`, zero-copy from a memory map.

    All complete batches when the journal was written in this boot (a process kill cannot
    tear what reached the kernel); after a reboot, only those before the last sync marker.
    A torn last message ends the read. Raises ``OSError`` or ``pyarrow.ArrowException`` when
    even the journal's schema cannot be read.
    """
    reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    meta = dict(reader.schema.metadata or {})
    written_in = meta.pop(_META_BOOT, None)
    boot = boot_id()
    same_boot = boot is not None and written_in == boot.encode()
    kept: list[pa.RecordBatch] = []
    unsynced: list[pa.RecordBatch] = []
    while True:
        try:
            batch, custom = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        except _READ_ERRORS:  # the message being written when the process died
            break
        if custom is not None and _META_SYNCED in custom:
            kept += unsynced
            unsynced = []
        else:
            unsynced.append(batch)
    return pa.Table.from_batches(kept + unsynced if same_boot else kept, schema=reader.schema.with_metadata(meta))


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` while the block runs; yield whether it was acquired.

    The kernel drops the lock when the process dies (even by SIGKILL), so a crashed run
    never blocks the next one. The file records pid and host of the holder for messages.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        try:
            yield True
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_holder(path: Path) -> str:
    """Who holds (or last held) the lock file, e.g. ``"pid=12 host=node3"``; empty if unknown."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# --- fast vector reads -------------------------------------------------------------------
#
# pyarrow decodes a Parquet LIST value by value (repetition + definition levels), which
# makes a fixed-size-list column ~5x slower to read than its raw bytes. The vector column
# is written as PLAIN, uncompressed, v2 data pages, whose header states the byte length of
# the levels, so the floats of each page are one contiguous run we can pread into the
# output array. Any file that is not exactly like that falls back to pyarrow.


class NotPlain(Exception):
    """The column chunk is not PLAIN/uncompressed/v2 without nulls: use the generic reader."""


def _varint(b: bytes, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        x = b[i]
        i += 1
        r |= (x & 0x7F) << s
        s += 7
        if not x & 0x80:
            return r, i


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _skip(b: bytes, i: int, t: int) -> int:
    if t in (1, 2, 3):  # bool inside a container, byte
        return i + 1
    if t in (4, 5, 6):
        return _varint(b, i)[1]
    if t == 7:
        return i + 8
    if t == 8:
        n, i = _varint(b, i)
        return i + n
    if t == 12:
        return _struct(b, i)[1]
    if t in (9, 10):
        x = b[i]
        i += 1
        n, et = x >> 4, x & 0x0F
        if n == 15:
            n, i = _varint(b, i)
        for _ in range(n):
            i = _skip(b, i, et)
        return i
    msg = f"thrift type {t}"
    raise NotPlain(msg)


def _struct(b: bytes, i: int) -> tuple[dict[int, Any], int]:
    """Decode a Thrift compact-protocol struct: integer/bool/struct fields by id; others skipped."""
    out: dict[int, Any] = {}
    fid = 0
    while True:
        h = b[i]
        i += 1
        if h == 0:
            return out, i
        t, delta = h & 0x0F, h >> 4
        if delta:
            fid += delta
        else:
            v, i = _varint(b, i)
            fid = _zigzag(v)
        if t in (1, 2):
            out[fid] = t == 1
        elif t in (4, 5, 6):
            v, i = _varint(b, i)
            out[fid] = _zigzag(v)
        elif t == 12:
            out[fid], i = _struct(b, i)
        else:
            i = _skip(b, i, t)


def _page_header(fd: int, offset: int) -> tuple[dict[int, Any], int]:
    for size in (512, 1 << 16, 1 << 22):
        buf = os.pread(fd, size, offset)
        try:
            return _struct(buf, 0)
        except RecursionError as e:  # garbage bytes read as deeply nested structs
            msg = "page header"
            raise NotPlain(msg) from e
        except IndexError:
            if len(buf) < size:
                break
    msg = "truncated page header"
    raise NotPlain(msg)


_DATA_PAGE_V2 = 3
_PLAIN = 0


def read_vectors_into(
    path: Path, md: pq.FileMetaData, column: str, out: np.ndarray, row_groups: Sequence[int] | None = None
) -> None:
    """Read a float32 fixed-size-list column straight into ``out`` (rows x dim, C-contiguous).

    ``row_groups`` limits the read to those row groups (all by default). Raises
    :class:`NotPlain` when the column is not stored as PLAIN, uncompressed v2 pages without
    nulls; the caller then uses pyarrow.
    """
    leaf = next(
        (i for i in range(md.num_columns) if md.schema.column(i).path.split(".")[0] == column),
        None,
    )
    if leaf is None or md.schema.column(leaf).physical_type != "FLOAT":
        raise NotPlain(column)
    flat = out.reshape(-1)
    if not flat.flags.c_contiguous or flat.dtype != np.float32:
        msg = "output"
        raise NotPlain(msg)
    pos = 0
    with Path(path).open("rb", buffering=0) as f:
        fd = f.fileno()
        for rg in range(md.num_row_groups) if row_groups is None else row_groups:
            cc = md.row_group(rg).column(leaf)
            if cc.compression != "UNCOMPRESSED" or cc.has_dictionary_page:
                raise NotPlain(cc.compression)
            off = cc.data_page_offset
            end = off + cc.total_compressed_size
            while off < end:
                h, hlen = _page_header(fd, off)
                v2 = h.get(8)
                if h.get(1) != _DATA_PAGE_V2 or v2 is None or v2.get(4) != _PLAIN or v2.get(2, 0) != 0:
                    msg = "page"
                    raise NotPlain(msg)
                n = v2.get(1, 0)
                if n <= 0 or pos + n > flat.size or h.get(3, 0) <= 0:
                    msg = "size"
                    raise NotPlain(msg)
                body = off + hlen + v2.get(5, 0) + v2.get(6, 0)
                view = memoryview(flat[pos : pos + n]).cast("B")
                got = os.preadv(fd, [view], body)
                if got != view.nbytes:
                    msg = "short read"
                    raise NotPlain(msg)
                pos += n
                off += hlen + h[3]
    if pos != flat.size:
        msg = "count"
        raise NotPlain(msg)


def vectors_from_arrow(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """(rows, dim) float32 array from an Arrow (fixed-size) list column, copying only to cast."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        msg = "embedding column has null vectors"
        raise BadInput(msg)
    values = col.flatten() if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) else col.values
    if pa.types.is_fixed_size_list(col.type) and col.offset:
        values = values.slice(col.offset * dim, len(col) * dim)
    arr = values.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(len(col), dim)
