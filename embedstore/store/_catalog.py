"""The DuckDB catalog of a store: views over its Parquet files, and the confined sessions that query them."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore._schema import Col, embedding_schema, expression_schema, spots_schema
from embedstore.errors import BadInput
from embedstore.store import _retrieval_sql
from embedstore.store._integrity import inspect_slide_file, inspect_table_file, read_footer, repair_hint
from embedstore.store._layout import EMBEDDING_KEYS, SECTION_KEYS

LOG = logging.getLogger(__name__)

# Gene sentences, one file per ST section: STORE/sentences/cohort=<c>/slide_id=<s>/sentences.parquet,
# written by embedstore.sentences (derived from the expression files, so rewritten rather than repaired).
SENTENCES = "sentences"
SENTENCES_FILE = "sentences.parquet"
SENTENCES_FIX = "remove it and run embedstore embed-text (or embedstore.sentences.write_sentences) again"


def sentences_schema() -> pa.Schema:
    """Arrow schema of the ``sentences`` view: one OmiCLIP/Loki gene sentence per spot."""
    return pa.schema(
        [
            pa.field(Col.COHORT, pa.string(), nullable=False),
            pa.field(Col.SLIDE_ID, pa.string(), nullable=False),
            pa.field(Col.SPOT_ID, pa.string(), nullable=False),
            pa.field(Col.SENTENCE, pa.string(), nullable=False),
            pa.field(Col.N_GENES, pa.int32(), nullable=False),
        ]
    )


def view_name(encoder: str) -> str:
    """SQL name of the per-encoder view, e.g. ``embeddings_timm_vit_small``."""
    return "embeddings_" + re.sub(r"\W", "_", encoder).lower()


def _lit(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def encoder_info(root: Path) -> list[dict[str, Any]]:
    """One dict per encoder folder with files: name, dim, fingerprint, family, glob.

    Every file the views will scan passes the cheap checks first, so a damaged or foreign
    file is one :class:`~embedstore.errors.DamagedFile` line naming it and the repair command.
    """
    fix = repair_hint(root)
    out = []
    for d in sorted((root / "embeddings").glob("encoder=*")):
        files = sorted(d.glob("cohort=*/slide_id=*/*.parquet"))
        if not files:
            continue
        infos = [inspect_slide_file(f, fix) for f in files]
        dims = {i.dim for i in infos}
        if len(dims) > 1:
            odd = next(i for i in infos if i.dim != infos[0].dim)
            msg = f"{odd.path}: embeddings of dim {odd.dim}, other files of {d.name} have {infos[0].dim}; {fix}"
            raise BadInput(msg)
        out.append(
            {
                "encoder": d.name.split("=", 1)[1],
                "dim": infos[0].dim,
                "fingerprint": infos[0].fingerprint,
                "family": infos[0].encoder.get("family"),
                "n_files": len(files),
                "glob": str(d / "cohort=*" / "slide_id=*" / "*.parquet"),
            }
        )
    return out


# DuckDB settings of every SQL session. Queries see the store through the views only: the
# views scan Arrow datasets that embedstore lists itself, so DuckDB needs no file access, and
# it gets none (read-only) or only the store folder (writable; see _session). No extension is
# installed or loaded behind the query's back, no secret is persisted, no Python variable is
# read by name, and nothing spills to disk: the default temp folder, ``.tmp`` in the working
# directory, would be one more place a query could write to.
_CONFIG = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "allow_persistent_secrets": False,
    "python_enable_replacements": False,
    "temp_directory": "",
}
_VIEWS = "embeddings_<encoder>, embeddings (one-encoder stores), encoders, slides, spots, expression, sentences"
_UDF_ERROR = re.compile(
    r"Python exception occurred while executing the UDF: (?:BadInput|DamagedFile|FingerprintMismatch|"
    r"GeometryMismatch|MissingDependency): (.*)"
)
_NO_EMBEDDINGS_VIEW = re.compile(r"Table with name embeddings does not exist", re.IGNORECASE)


class Catalog:
    """The store's tables as DuckDB sees them: Arrow datasets over the files and the SQL views.

    The files are listed once (:func:`create_views` lists them again). A read-only catalog
    runs each query in a fresh DuckDB session, statement by statement in read-only
    transactions, so nothing a query does outlives it. A writable catalog keeps one session,
    so tables made in memory persist from one query to the next.
    """

    def __init__(self, root: Path, read_only: bool) -> None:
        self.root = root
        self.read_only = read_only
        self.encoders: list[dict[str, Any]] = []
        self.sources: dict[str, Any] = {}
        self.views: dict[str, str] = {}
        self._con: duckdb.DuckDBPyConnection | None = None

    def session(self) -> duckdb.DuckDBPyConnection:
        """The writable catalog's one session, or a new session for a read-only query."""
        if self.read_only:
            return self._new_session()
        if self._con is None:
            self._con = self._new_session()
        return self._con

    def close(self, con: duckdb.DuckDBPyConnection) -> None:
        """End a session that :meth:`session` handed out for one read-only query."""
        if con is not self._con:
            con.close()

    def _new_session(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:", config=_CONFIG)
        self._install(con)
        if not self.read_only:
            # Only a folder may be listed before external access is switched off.
            con.execute(f"SET allowed_directories = [{_lit(str(self.root).rstrip('/') + '/')}]")
        con.execute("SET enable_external_access = false")
        # Locked, no query can switch any of the settings above back (SET and RESET fail).
        con.execute("SET lock_configuration = true")
        return con

    def _install(self, con: duckdb.DuckDBPyConnection, old: dict[str, Any] | None = None) -> None:
        """Register the sources and (re)create the views; ``old`` are those installed before."""
        old = old or {}
        for name in set(old) - set(self.views) - set(self.sources):
            # A view or source of the previous listing: an encoder gone, or `embeddings` once
            # a second encoder arrived. Tables a writable session made itself are kept.
            con.execute(f"DROP VIEW IF EXISTS {name}")
        for name, source in self.sources.items():
            con.register(name, source)
        for name, body in self.views.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
        con.execute("CREATE OR REPLACE MACRO cosine(a, b) AS array_cosine_similarity(a, b)")
        _retrieval_sql.install(con, self.root)

    def refresh(self) -> None:
        """List the files again and rebuild the views (in the writable session too)."""
        old = {**self.views, **self.sources}
        self.encoders, self.sources, self.views = _tables(self.root)
        if self._con is not None:
            for name in set(old) - set(self.views) - set(self.sources):
                if name.startswith("_src_"):
                    self._con.unregister(name)
            self._install(self._con, {k: v for k, v in old.items() if not k.startswith("_src_")})


def connect(root: Path, read_only: bool = True) -> Catalog:
    """The :class:`Catalog` of the store at ``root`` (SQL writes allowed when not ``read_only``)."""
    catalog = Catalog(Path(root), read_only)
    catalog.refresh()
    return catalog


def create_views(catalog: Catalog, root: Path) -> None:
    """(Re)create the views ``embeddings_<encoder>``, ``embeddings`` (one-encoder stores only),
    ``encoders``, ``slides``, ``spots``, ``expression``, ``sentences`` and the macro ``cosine(a, b)``."""
    catalog.root = Path(root)
    catalog.refresh()


def _guarded(source: str, info: dict[str, Any], view: str) -> str:
    """Per-encoder view: the vector as ``FLOAT[dim]``, and an error, not a silent mix, for any
    slide whose fingerprint differs from the encoder's (weights changed between runs)."""
    dim, fp = info["dim"], info["fingerprint"]
    vec = f"CAST({Col.EMBEDDING} AS FLOAT[{dim}])"
    if fp is None:
        return f"SELECT * REPLACE ({vec} AS {Col.EMBEDDING}) FROM {source}"
    safe = fp.replace("'", "''")
    why = (
        f"{view}: vectors of two encoder fingerprints, {safe[:12]} and ' || left({Col.FINGERPRINT}, 12) || "
        f"' (slide ' || {Col.COHORT} || '/' || {Col.SLIDE_ID} || '); one encoder name holds one model''s "
        f"vectors: re-embed the slides of the wrong one (SELECT DISTINCT {Col.COHORT}, {Col.SLIDE_ID}, "
        f"{Col.FINGERPRINT} FROM {view} lists them)"
    )
    return (
        f"SELECT * REPLACE (CASE WHEN {Col.FINGERPRINT} = {_lit(fp)} THEN {vec} "
        f"ELSE error('{why}') END AS {Col.EMBEDDING}) FROM {source}"
    )


def _dataset(files: list[str], base: Path, schema: pa.Schema, keys: tuple[str, ...]) -> Any:
    """Arrow dataset over store files below ``base``, its partition keys taken from their folders.

    A key a layout-1 file also holds inside reads from the path all the same.
    """
    import pyarrow.dataset as ds

    partitioning = ds.HivePartitioning(pa.schema([(k, pa.string()) for k in keys]), segment_encoding="none")
    return ds.dataset(files, format="parquet", schema=schema, partitioning=partitioning, partition_base_dir=str(base))


def _tables(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, str]]:
    """List the store's files: (encoder infos, Arrow sources by name, view SQL by name)."""
    infos = encoder_info(root)
    sources: dict[str, Any] = {}
    views: dict[str, str] = {}
    names = [view_name(i["encoder"]) for i in infos]
    tiles = []
    for k, (info, view) in enumerate(zip(infos, names, strict=True)):
        source = f"_src_embeddings_{k}"
        folder = root / "embeddings" / f"encoder={info['encoder']}"
        files = sorted(str(f) for f in folder.glob("cohort=*/slide_id=*/*.parquet"))
        schema = embedding_schema(info["dim"]).remove_metadata()
        sources[source] = _dataset(files, root / "embeddings", schema, EMBEDDING_KEYS)
        tiles.append(f"SELECT * EXCLUDE ({Col.EMBEDDING}) FROM {source}")
        if names.count(view) > 1:
            # Two folders such as encoder=test-vit and encoder=test_vit: no view guesses which.
            if names.index(view) == k:
                shared = [i["encoder"] for i, n in zip(infos, names, strict=True) if n == view]
                LOG.warning("%s: encoders %s share this SQL name; none gets a view", view, ", ".join(shared))
            info["view"] = None
            continue
        info["view"] = view
        views[view] = _guarded(source, info, view)
    if not infos:
        sources["_src_empty_embeddings"] = embedding_schema(1).empty_table()
        views["embeddings"] = "SELECT * FROM _src_empty_embeddings"
        tiles.append(f"SELECT * EXCLUDE ({Col.EMBEDDING}) FROM _src_empty_embeddings")
    elif len(infos) == 1 and infos[0]["view"]:
        # One encoder: `embeddings` is its view. With several there is none, since their rows and
        # vectors must not meet in one table (see run_sql's message).
        views["embeddings"] = f"SELECT * FROM {infos[0]['view']}"
    views["slides"] = (
        f"SELECT {Col.ENCODER}, {Col.COHORT}, {Col.SLIDE_ID}, count(*) AS n_tiles, "
        f"any_value({Col.FINGERPRINT}) AS {Col.FINGERPRINT}, any_value({Col.MPP}) AS {Col.MPP}, "
        f"any_value({Col.SIZE_PX}) AS {Col.SIZE_PX}, count({Col.SPOT_ID}) AS n_spot_tiles "
        f"FROM ({' UNION ALL BY NAME '.join(tiles)}) GROUP BY ALL"
    )
    sources["_src_encoders"] = pa.table(
        {
            "encoder": pa.array([i["encoder"] for i in infos], pa.string()),
            "family": pa.array([i["family"] for i in infos], pa.string()),
            "dim": pa.array([i["dim"] for i in infos], pa.int32()),
            "fingerprint": pa.array([i["fingerprint"] for i in infos], pa.string()),
            "n_slides": pa.array([i["n_files"] for i in infos], pa.int64()),
            "view": pa.array([i["view"] for i in infos], pa.string()),
        }
    )
    views["encoders"] = "SELECT * FROM _src_encoders"
    fix = repair_hint(root)
    for name, fname in (("spots", "spots.parquet"), ("expression", "expression.parquet")):
        paths = sorted((root / name).glob(f"cohort=*/slide_id=*/{fname}"))
        # A damaged file is one line naming it and the repair, here rather than deep in a scan.
        footers = [inspect_table_file(p, name, fix) for p in paths]
        files = [str(p) for p in paths]
        schema = spots_schema() if name == "spots" else _expression_schema(footers)
        # An explicit schema fills columns an older file lacks with NULL (DuckDB's union_by_name).
        sources[f"_src_{name}"] = _dataset(files, root / name, schema, SECTION_KEYS) if files else schema.empty_table()
        views[name] = f"SELECT * FROM _src_{name}"
    # Gene sentences (embedstore.sentences): empty, like spots, until some are written.
    paths = sorted((root / SENTENCES).glob(f"cohort=*/slide_id=*/{SENTENCES_FILE}"))
    for p in paths:
        read_footer(p, SENTENCES_FIX)
    sources["_src_sentences"] = (
        _dataset([str(p) for p in paths], root / SENTENCES, sentences_schema(), SECTION_KEYS)
        if paths
        else sentences_schema().empty_table()
    )
    views[SENTENCES] = "SELECT * FROM _src_sentences"
    return infos, sources, views


def _expression_schema(footers: list[pq.FileMetaData]) -> pa.Schema:
    """Counts are int32, or float32 in sections with non-integer values; mixed, they read as float32."""
    types = {md.schema.to_arrow_schema().field(Col.COUNT).type for md in footers}
    return expression_schema(pa.int32() if types <= {pa.int32()} else pa.float32())


def _one_line(e: BaseException) -> str:
    """DuckDB's message without the echo of the query and its caret that follow it."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _sql_error(catalog: Catalog, e: BaseException) -> BadInput:
    text = _one_line(e)
    own = re.match(r"Invalid Input Error: (embeddings_\w+: .*)", text)
    if own:  # the per-encoder view's fingerprint guard says it all
        return BadInput(own.group(1))
    ours = _UDF_ERROR.search(text)
    if ours:  # nearest_tiles / similar_tiles / text_tiles raised one of embedstore's own one-line errors
        return BadInput(ours.group(1))
    if len(catalog.encoders) > 1 and _NO_EMBEDDINGS_VIEW.search(text):
        listed = ", ".join(f"{i['view']} ({i['dim']}-d)" for i in catalog.encoders if i["view"])
        clash = [i["encoder"] for i in catalog.encoders if not i["view"]]
        msg = (
            f"query: this store holds {len(catalog.encoders)} encoders, so there is no `embeddings` view "
            f"(their tiles and vectors must not be mixed); query one of {listed or 'the per-encoder views'}, "
            "or `slides` / `encoders` for all of them"
            + (f" (encoders {', '.join(clash)} share one SQL name and have no view: rename one)" if clash else "")
        )
    elif isinstance(e, duckdb.PermissionException):
        where = (
            f"and may read and write files inside {catalog.root} only"
            if not catalog.read_only
            else "and opens no file (--write / open_store(path, read_only=False) allows files inside the store)"
        )
        msg = f"query: {text}; SQL on a store reads it through the views ({_VIEWS}) {where}"
    elif isinstance(e, duckdb.TransactionException) and catalog.read_only:
        msg = (
            f"query: {text}; the store is open read-only: use --write / open_store(path, read_only=False) "
            "for statements that write"
        )
    elif isinstance(e, FileNotFoundError) or ("registered as '_src_" in text and "No such file" in text):
        msg = f"query: {text}; the store's files changed since its views were made: open the store again"
    elif "registered as '_src_" in text or isinstance(e, pa.ArrowException | OSError):  # a view's file is unreadable
        msg = (
            f"query: {text}; a file of the store is damaged: `embedstore check {catalog.root}` names it "
            f"and `embedstore check {catalog.root} --repair` rebuilds it"
        )
    else:
        msg = f"query: {text}; fix the SQL (views: {_VIEWS}; macros cosine(a, b), nearest_tiles, similar_tiles, text_tiles)"
    return BadInput(msg)


def _check_vectors(result: Any, output: str) -> None:
    """Refuse a result whose ``embedding`` column mixes vector lengths, or vectors of several
    fingerprints: stacked into one matrix, they would be numbers without meaning."""
    if output == "arrow":
        import pyarrow.compute as pc

        if Col.EMBEDDING not in result.column_names:
            return
        emb = result.column(Col.EMBEDDING)
        if pa.types.is_fixed_size_list(emb.type):
            lengths = {emb.type.list_size} if len(emb) else set()
        elif pa.types.is_list(emb.type) or pa.types.is_large_list(emb.type):
            lengths = set(pc.unique(pc.list_value_length(emb)).drop_null().to_pylist())
        else:
            return
        fps = result.column(Col.FINGERPRINT) if Col.FINGERPRINT in result.column_names else None
        distinct = set() if fps is None else set(pc.unique(fps).drop_null().to_pylist())
    else:
        if Col.EMBEDDING not in result:
            return
        lengths = {len(v) for v in result[Col.EMBEDDING] if isinstance(v, np.ndarray | list)}
        if not lengths:
            return
        fps = result.get(Col.FINGERPRINT, ())
        distinct = {f for f in fps if isinstance(f, str)}
    if len(lengths) > 1:
        msg = (
            f"query: column {Col.EMBEDDING} mixes vectors of {' and '.join(map(str, sorted(lengths)))} values "
            "(several encoders); select from one embeddings_<encoder> view at a time"
        )
        raise BadInput(msg)
    if len(distinct) > 1:
        msg = (
            f"query: column {Col.EMBEDDING} holds vectors of {len(distinct)} encoder fingerprints "
            f"({', '.join(sorted(f[:12] for f in distinct))}); select from one embeddings_<encoder> view at a time"
        )
        raise BadInput(msg)


def run_sql(catalog: Catalog, query: str, params: Any, output: str) -> Any:
    """Run ``query`` on the catalog and return the last statement's result as pandas, arrow or numpy.

    DuckDB enforces the limits (see :data:`_CONFIG` and :class:`Catalog`): a read-only
    catalog's statements each run in a read-only transaction of a throwaway session that may
    open no file; a writable catalog's session may read and write files inside the store only.
    """
    if output not in ("pandas", "arrow", "numpy"):
        msg = f"output={output!r}: not a known output; use 'pandas', 'arrow' or 'numpy'"
        raise BadInput(msg)
    if not isinstance(query, str) or not query.strip():
        msg = "query: empty SQL; give a SELECT statement"
        raise BadInput(msg)
    con = catalog.session()
    try:
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as e:
            raise _sql_error(catalog, e) from e
        if not statements:
            msg = "query: empty SQL; give a SELECT statement"
            raise BadInput(msg)
        result = None
        for k, statement in enumerate(statements):
            last = k == len(statements) - 1
            try:
                if catalog.read_only:
                    con.execute("BEGIN TRANSACTION READ ONLY")
                try:
                    if last:
                        result = _fetch(con, statement, params, output)
                    else:
                        con.execute(statement)
                finally:
                    if catalog.read_only:
                        _end_transaction(con)
            except (duckdb.Error, pa.ArrowException, OSError) as e:
                raise _sql_error(catalog, e) from e
    finally:
        catalog.close(con)
    _check_vectors(result, output)
    return result


def _end_transaction(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.TransactionException:
        # The statement was itself a COMMIT or ROLLBACK; the next statement gets a new
        # read-only transaction all the same.
        LOG.debug("read-only transaction already ended by the query")


def _fetch(con: duckdb.DuckDBPyConnection, statement: Any, params: Any, output: str) -> Any:
    if output == "arrow":  # the relation API hands Arrow over without an extra copy
        rel = con.sql(statement.query, params=params)
        return rel.to_arrow_table() if rel is not None else pa.table({})
    res = con.execute(statement, params) if params is not None else con.execute(statement)
    return res.fetchnumpy() if output == "numpy" else res.df()
