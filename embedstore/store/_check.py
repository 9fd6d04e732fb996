"""``embedstore check``'s reading half: verify every file of a store, like ``git fsck``.

Repairing (moving files aside, re-embedding) needs the encoders, so it lives in
:func:`embedstore.embedding.check_store`; this module only reads and reports.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from embedstore._schema import describe_geometry
from embedstore.errors import BadInput, DamagedFile
from embedstore.store import _expression
from embedstore.store._integrity import (
    QUARANTINE,
    file_version,
    inspect_slide_file,
    repair_hint,
    verify_slide_file,
    verify_table_file,
)
from embedstore.store._layout import OLD_LAYOUT
from embedstore.store._writer import SLIDE_FILE, read_staged, staged_files

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong in a store.

    ``kind`` says what repairs it: ``"slide"`` (a published slide file: re-embed),
    ``"part"`` (a staged batch: move aside, resume), ``"staging"`` (staged batches of a slide
    already published: remove), ``"stray"`` (a file that does not belong where SQL reads:
    move aside), ``"section"`` (spots or expression: write again from the source).
    """

    path: Path
    what: str
    kind: str
    encoder: str | None
    cohort: str
    slide_id: str

    def line(self) -> str:
        """``"<file>: <what is wrong>"``."""
        return f"{self.path}: {self.what}"


@dataclasses.dataclass
class StoreCheck:
    """What :func:`verify_store` found."""

    root: Path
    n_files: int
    problems: list[Problem]
    notes: list[str]


def _value(d: Path) -> str:
    return d.name.split("=", 1)[1]


def verify_store(store: Any) -> StoreCheck:
    """Read every file of a store completely (page CRCs included) and list what is wrong.

    Parameters
    ----------
    store
        An open :class:`~embedstore.store.Store`.
    """
    root = store.root
    fix = repair_hint(root)
    problems: list[Problem] = []
    notes: list[str] = []
    n_files = 0
    old_layout = 0
    kinds: dict[str, set[str]] = {}
    for slide in sorted((root / "embeddings").glob("encoder=*/cohort=*/slide_id=*")):
        encoder, cohort, slide_id = _value(slide.parent.parent), _value(slide.parent), _value(slide)
        for path in sorted(slide.glob("*.parquet")):
            n_files += 1
            if path.name != SLIDE_FILE:
                what = f"not a file embedstore writes here (SQL reads every *.parquet of a slide folder; expected only {SLIDE_FILE})"
                problems.append(Problem(path, what, "stray", encoder, cohort, slide_id))
                continue
            try:
                info = verify_slide_file(path, fix, encoder, cohort, slide_id)
            except (DamagedFile, BadInput) as e:
                what = e.problem if isinstance(e, DamagedFile) else str(e).split(": ", 1)[-1]
                problems.append(Problem(path, what, "slide", encoder, cohort, slide_id))
                continue
            kinds.setdefault(encoder, set()).add(f"fingerprint {info.fingerprint}, {describe_geometry(info.geometry)}")
            old_layout += info.version == OLD_LAYOUT
    for encoder, seen in kinds.items():
        if len(seen) > 1:  # legitimate per cohort, but read_embeddings across them refuses
            notes.append(
                f"encoder {encoder}: slides of {len(seen)} kinds ({'; '.join(sorted(seen))}) cannot be read together"
            )

    for staging in sorted((root / "_staging").glob("encoder=*/cohort=*/slide_id=*")):
        encoder, cohort, slide_id = _value(staging.parent.parent), _value(staging.parent), _value(staging)
        parts = staged_files(staging)
        n_files += len(parts)
        if store.stale_staging(encoder, cohort, slide_id):
            what = "staged batches of a slide already published (left by a run killed after publishing)"
            problems.append(Problem(staging, what, "staging", encoder, cohort, slide_id))
            continue
        damaged = False
        for part in parts:
            try:
                if part.suffix == ".arrows":
                    read_staged(part, fix)  # a journal: every batch in it readable (a torn last one is dropped)
                else:
                    inspect_slide_file(part, fix, part=True)
            except (DamagedFile, BadInput) as e:
                what = e.problem if isinstance(e, DamagedFile) else str(e).split(": ", 1)[-1]
                problems.append(Problem(part, what, "part", encoder, cohort, slide_id))
                damaged = True
        if parts and not damaged and not (root / "embeddings" / staging.relative_to(root / "_staging")).is_dir():
            notes.append(f"{staging}: slide partly embedded by an interrupted run; rerun embed to finish it")

    for cohort, slide_id, spots_path, expr_path in _expression.section_files(root):
        for path, kind in ((spots_path, "spots"), (expr_path, "expression")):
            if not path.is_file():
                problems.append(
                    Problem(path, "missing (the section's other file is there)", "section", None, cohort, slide_id)
                )
                continue
            n_files += 1
            try:
                old_layout += file_version(verify_table_file(path, kind, fix)) == OLD_LAYOUT
            except (DamagedFile, BadInput) as e:
                what = e.problem if isinstance(e, DamagedFile) else str(e).split(": ", 1)[-1]
                problems.append(Problem(path, what, "section", None, cohort, slide_id))

    if old_layout:
        notes.append(
            f"{root}: {old_layout} file(s) of store layout {OLD_LAYOUT} hold cohort, slide_id (and encoder) inside "
            "as well as in their folder names; embedstore reads them, but pandas rejects those folders "
            "(embed the slides into a new store to rewrite them)"
        )
    notes.extend(_tile_index_notes(root))
    held = [p for p in (root / QUARANTINE).rglob("*") if p.is_file()] if (root / QUARANTINE).is_dir() else []
    if held:
        notes.append(
            f"{root / QUARANTINE}: {len(held)} file(s) moved aside by earlier repairs; delete them when not needed"
        )
    return StoreCheck(root, n_files, problems, notes)


def _tile_index_notes(root: Path) -> list[str]:
    """A line per tile index that is behind the store or unreadable, with the command that fixes it."""
    from embedstore.store import _tile_search as ts

    notes = []
    for folder in sorted((root / ts.FOLDER).glob("encoder=*")):
        encoder = folder.name.split("=", 1)[1]
        hint = ts.update_hint(root, encoder)
        try:
            manifest = ts.read_manifest(folder, encoder)
            if manifest is None:
                continue
            ts.read_tiles(folder, manifest)
            if (folder / ts.INDEX_FILE).stat().st_size != manifest.get("files", {}).get(ts.INDEX_FILE):
                raise ts.damaged(folder, ts.INDEX_FILE, "not the size its manifest records")
        except (BadInput, OSError) as e:
            notes.append(f"{e}".split("; rebuild it")[0] + f"; searches scan the files instead: `{hint} --rebuild`")
            continue
        covered = {(e["cohort"], e["slide_id"], tuple(e["version"])) for e in manifest["slides"]}
        present = {(s.cohort, s.slide_id, s.version) for s in ts.list_slides(root, encoder)}
        if covered != present:
            notes.append(
                f"{folder}: tile index behind the store ({len(present - covered)} slide(s) embedded or changed "
                f"since, searched exactly until then; {len(covered - present)} gone); `{hint}` updates it"
            )
    return notes
