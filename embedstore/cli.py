"""The ``embedstore`` command: one subcommand per stage, each one public call.

Errors that embedstore raises on purpose (``EmbedstoreError``) print one line and exit 2
(1 for a full disk or file-size limit, which is not the user's input).
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from embedstore.errors import EmbedstoreError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Predict spatial gene expression from H&E: tile, embed once, align, index, predict, evaluate.",
)
index_app = typer.Typer(no_args_is_help=True, help="Build and inspect exemplar indexes and a store's tile index.")
app.add_typer(index_app, name="index")

# Paths are checked by the library, which names the file and the fix in one line (exit 2);
# typer's own check would print a multi-line usage box instead.
InputPath = Annotated[Path, typer.Argument(help="Input file or folder.")]
# Options several commands share.
LayoutOption = Annotated[
    str,
    typer.Option(
        help="auto, memory or ondisk: where the FAISS inverted lists live (auto: on disk past --memory-budget)."
    ),
]
MemoryBudgetOption = Annotated[
    str | None, typer.Option(help="Memory the build may hold, e.g. 8GB; default: half the available memory.")
]
AddressOption = Annotated[
    str | None, typer.Option(help="Ray head node host:port; default RAY_ADDRESS, else Ray on this machine.")
]


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines, only results and errors.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if quiet:
        logging.getLogger("embedstore.progress").setLevel(logging.WARNING)


@app.command()
def info(
    slide: InputPath,
    mpp: Annotated[float | None, typer.Option(help="µm/px when the slide's metadata lacks it.")] = None,
    target_mpp: Annotated[float, typer.Option(help="µm/px the tile count is computed at.")] = 0.5,
    size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 224,
) -> None:
    """Show a slide's properties, levels, µm/px, tissue fraction and tile count."""
    from embedstore.tiling import describe_slide

    for key, value in describe_slide(slide, mpp=mpp, target_mpp=target_mpp, size_px=size).items():
        typer.echo(f"{key:<18} {value}")


@app.command()
def tile(
    slide: InputPath,
    out: Annotated[Path, typer.Option("--out", "-o", help="Tile table to write (Parquet).")],
    mpp: Annotated[float | None, typer.Option(help="µm/px when the slide's metadata lacks it.")] = None,
    target_mpp: Annotated[float, typer.Option(help="µm/px to tile at.")] = 0.5,
    size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 224,
    min_tissue: Annotated[float, typer.Option(help="Minimum tissue fraction of a tile.")] = 0.25,
    preview: Annotated[Path | None, typer.Option(help="Also write a thumbnail PNG with the grid drawn.")] = None,
) -> None:
    """Write the tissue tile grid of a slide, and optionally a preview of it."""
    from embedstore.tiling import tile as tile_slide

    table = tile_slide(slide, out, mpp=mpp, target_mpp=target_mpp, size_px=size, min_tissue=min_tissue, preview=preview)
    padded = sum(table.column("padded").to_pylist())
    typer.echo(f"{table.num_rows} tiles ({padded} padded at the border) -> {out}")
    if preview:
        typer.echo(f"preview -> {preview}")


@app.command()
def encoders() -> None:
    """List the registered encoders with dimension, licence and weight source."""
    from embedstore.encoders import list_encoders

    typer.echo(list_encoders().to_string())


@app.command()
def embed(
    data: InputPath,
    store: Annotated[Path, typer.Option(help="Store folder (created when missing).")],
    encoder: Annotated[str | None, typer.Option(help="Encoder name; the built-in one by default.")] = None,
    weights: Annotated[str | None, typer.Option(help="hf-hub:org/repo, local-dir:/path or a weight file.")] = None,
    cohort: Annotated[str | None, typer.Option(help="Cohort name; the data folder's name by default.")] = None,
    mpp: Annotated[float | None, typer.Option(help="µm/px for every slide.")] = None,
    mpp_csv: Annotated[Path | None, typer.Option(help="CSV with columns slide,mpp.")] = None,
    target_mpp: Annotated[float | None, typer.Option(help="µm/px to tile at; the encoder's own by default.")] = None,
    size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 224,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 32,
    workers: Annotated[int, typer.Option(help="Worker processes reading tiles.")] = 2,
    engine: Annotated[
        str, typer.Option(help="local (this machine) or ray (a Ray cluster; pip install 'embedstore[ray]').")
    ] = "local",
    address: AddressOption = None,
    stain_norm: Annotated[
        str | None,
        typer.Option(help="macenko: normalise each slide's stain before the encoder (another fingerprint)."),
    ] = None,
) -> None:
    """Embed a slide, a folder of slides, or an ST data set into a Parquet store (resumable)."""
    from embedstore.embedding import embed as run_embed

    report = run_embed(
        data, store, encoder, weights=weights, cohort=cohort, mpp=mpp, mpp_csv=mpp_csv,
        target_mpp=target_mpp, size_px=size, device=device, batch_size=batch_size, workers=workers,
        engine=engine, address=address, stain_norm=stain_norm,
    )  # fmt: skip
    typer.echo(report.summary())
    typer.echo(f"table: {report.store}/embeddings/encoder={report.encoder}/cohort={report.cohort}/")
    typer.echo(f'query: embedstore sql {report.store} "SELECT slide_id, count(*) FROM embeddings GROUP BY 1"')
    if not report.ok:
        raise typer.Exit(1)


@app.command("embed-text")
def embed_text(
    store: InputPath,
    encoder: Annotated[str, typer.Option(help="CLIP/CoCa encoder with a text tower (OmiCLIP: omiclip).")] = "omiclip",
    weights: Annotated[str | None, typer.Option(help="hf-hub:org/repo, local-dir:/path or a weight file.")] = None,
    cohort: Annotated[str | None, typer.Option(help="Only this cohort's ST sections; all by default.")] = None,
    top_n: Annotated[int, typer.Option(help="Genes per gene sentence (OmiCLIP: 50).")] = 50,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Sentences per forward pass.")] = 64,
) -> None:
    """Write each ST spot's gene sentence and embed it once with the encoder's text tower (OmiCLIP/Loki)."""
    from embedstore.text_embedding import embed_text as run_embed_text

    report = run_embed_text(
        store, encoder, cohort=cohort, weights=weights, top_n=top_n, batch_size=batch_size, device=device
    )
    typer.echo(report.summary())
    typer.echo(f'query: embedstore sql {store} "SELECT slide_id, spot_id, sentence FROM sentences LIMIT 5"')


@app.command()
def context(
    store: InputPath,
    encoder: Annotated[str, typer.Option(help="The stored embeddings to add tissue context to.")],
    cohort: Annotated[str | None, typer.Option(help="Only this cohort's slides; all by default.")] = None,
    radius: Annotated[
        list[float] | None, typer.Option(help="Neighbourhood radius in µm, repeatable; default 250 and 600.")
    ] = None,
    mpp: Annotated[
        float | None, typer.Option(help="Level-0 µm/px for slides whose store records none and whose source is gone.")
    ] = None,
) -> None:
    """Store each tile's embedding with the mean embedding of its neighbours (per radius) as a new table."""
    from embedstore.context import DEFAULT_RADII_UM, embed_context

    report = embed_context(store, encoder, cohort=cohort, radii_um=radius or DEFAULT_RADII_UM, mpp=mpp)
    typer.echo(report.summary())
    typer.echo(f"table: {report.table} ({report.store}/embeddings/encoder={report.table}/)")
    typer.echo(f'use it as an encoder: recipe encoder = "{report.table}", or embedstore predict ... with its index')
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def sql(
    store: InputPath,
    query: Annotated[
        str,
        typer.Argument(
            help="SQL over the views embeddings_<encoder>, encoders, slides, spots, expression, and the "
            "table functions nearest_tiles(vector, k := 10) and similar_tiles(slide_id, tile_id, k := 10)."
        ),
    ],
    output: Annotated[str, typer.Option(help="table, csv or json.")] = "table",
    write: Annotated[
        bool,
        typer.Option(help="Allow statements that write: in-memory tables, and files inside the store folder only."),
    ] = False,
) -> None:
    """Run SQL on a store in DuckDB and print the result.

    Read-only by default: the query sees the store only through its views and opens no file.
    `embeddings` exists in a store of one encoder; with several, query embeddings_<encoder>.
    """
    from embedstore.errors import BadInput
    from embedstore.store import open_store

    if output not in ("table", "csv", "json"):
        msg = f"--output {output}: not a known format; use table, csv or json"
        raise BadInput(msg)
    df = open_store(store, read_only=not write).sql(query)
    if output == "csv":
        typer.echo(df.to_csv(index=False), nl=False)
    elif output == "json":
        typer.echo(df.to_json(orient="records"))
    else:
        typer.echo(df.to_string(index=False, max_rows=200))


@app.command()
def check(
    store: InputPath,
    repair: Annotated[
        bool,
        typer.Option(help="Move damaged files to STORE/_quarantine, clear stale staging, re-embed damaged slides."),
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N] (for re-embedding).")] = "auto",
) -> None:
    """Verify every file of a store (like git fsck); exit 1 while problems remain."""
    from embedstore.embedding import check_store

    report = check_store(store, repair=repair, device=device)
    for line in report.found:
        typer.echo(f"problem: {line}")
    for line in report.repaired:
        typer.echo(f"repaired: {line}")
    if repair:
        for line in report.remaining:
            typer.echo(f"remains: {line}")
    for line in report.notes:
        typer.echo(f"note: {line}")
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@index_app.command("build")
def index_build(
    recipe: Annotated[str, typer.Argument(help="Recipe name (see `index list`) or a .toml file.")],
    store: Annotated[Path, typer.Option(help="Store holding the reference embeddings and expression.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder to write.")],
    layout: LayoutOption = "auto",
    memory_budget: MemoryBudgetOption = None,
) -> None:
    """Build an exemplar index (aligner, FAISS, aggregator) from a recipe."""
    from embedstore.build import build_index

    path = build_index(recipe, store, out, layout=layout, memory_budget=memory_budget)
    typer.echo(f"index -> {path}")


@index_app.command("list")
def index_list() -> None:
    """List the recipes found in the recipe folders."""
    from embedstore.recipes import list_recipes

    for name in list_recipes():
        typer.echo(name)


@index_app.command("tiles")
def index_tiles(
    store: Annotated[Path, typer.Option(help="Store whose embedded tiles to index.")],
    encoder: Annotated[
        str | None, typer.Option(help="Encoder whose tiles to index; the store's only one by default.")
    ] = None,
    rebuild: Annotated[bool, typer.Option(help="Build from scratch instead of updating.")] = False,
    target_recall: Annotated[
        float, typer.Option(help="Recall@10 the search settings must reach on held-out tiles.")
    ] = 0.95,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N] for building.")] = "auto",
    layout: LayoutOption = "auto",
    memory_budget: MemoryBudgetOption = None,
    engine: Annotated[
        str,
        typer.Option(
            help="local, or ray: the shards of an on-disk build as Ray tasks (pip install 'embedstore[ray]'; "
            "the store at the same path on every node)."
        ),
    ] = "local",
    address: AddressOption = None,
) -> None:
    """Build or update the tile index of a store (nearest-tile search in SQL and `embedstore search`)."""
    from embedstore.tile_index import build_tile_index

    report = build_tile_index(
        store, encoder, rebuild=rebuild, target_recall=target_recall, device=device, layout=layout,
        memory_budget=memory_budget, engine=engine, address=address,
    )  # fmt: skip
    typer.echo(report.summary())
    typer.echo(f"index -> {report.path}")


@app.command()
def search(
    store: Annotated[Path, typer.Option(help="Store to search.")],
    slide: Annotated[str | None, typer.Option(help="Query by a stored tile: its slide id (with --tile).")] = None,
    tile: Annotated[str | None, typer.Option(help="Query by a stored tile: its tile id, x_y (with --slide).")] = None,
    image: Annotated[Path | None, typer.Option(help="Query by a picture of one tile at the store's µm/px.")] = None,
    text: Annotated[
        str | None, typer.Option(help="Query by gene symbols, e.g. 'ERBB2 GRB7 KRT19' (an encoder with a text tower).")
    ] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Tiles to return.")] = 20,
    encoder: Annotated[
        str | None, typer.Option(help="Encoder whose tiles to search; the store's only one by default.")
    ] = None,
    cohort: Annotated[str | None, typer.Option(help="Search only this cohort.")] = None,
    exclude_slide: Annotated[list[str] | None, typer.Option(help="Leave out this slide's tiles (repeatable).")] = None,
    weights: Annotated[
        str | None, typer.Option(help="Encoder weights for --image/--text; where the store records them by default.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Parquet file to write the hits to.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="PNG mosaic of the query and its hits, read from the slides.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N] for encoding --image or --text.")] = "auto",
) -> None:
    """Find the tiles of a store that look like a stored tile or a picture, or go with gene symbols (zero-shot)."""
    from embedstore.retrieval import search as run_search

    hits = run_search(
        store, slide=slide, tile=tile, image=image, text=text, k=k, encoder=encoder, cohort=cohort,
        exclude_slides=exclude_slide, weights=weights, out=out, plot=plot, device=device,
    )  # fmt: skip
    shown = ["rank", "cohort", "slide_id", "tile_id", "score"]
    typer.echo(hits.select(shown).to_pandas().to_string(index=False))
    if out:
        typer.echo(f"{hits.num_rows} hits -> {out}")
    if plot:
        typer.echo(f"mosaic -> {plot}")


@app.command()
def predict(
    index: Annotated[Path, typer.Option(help="Index folder.")],
    store: Annotated[Path, typer.Option(help="Store with the query embeddings.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="AnnData file to write (.h5ad), or a folder: one .h5ad per slide (resumable)."
        ),
    ],
    slide: Annotated[list[str] | None, typer.Option(help="Slide id(s) to predict; all by default.")] = None,
    cohort: Annotated[str | None, typer.Option(help="Cohort of the query slides.")] = None,
    k: Annotated[int | None, typer.Option(help="Neighbours; the index's own by default.")] = None,
    aggregator: Annotated[str | None, typer.Option(help="mean, softmax, idw, loki or learned.")] = None,
    exclude_own: Annotated[
        str | None,
        typer.Option(help="Leave out the exemplars of the query's own slide (slide) or its patient's (patient)."),
    ] = None,
    plot: Annotated[bool, typer.Option(help="Also write maps of the top predicted genes (PNG).")] = False,
    smooth: Annotated[
        bool, typer.Option(help="Smooth over neighbouring tiles, as strongly as chosen on the index's reference.")
    ] = False,
    engine: Annotated[
        str, typer.Option(help="local, or ray: slides sharded over a Ray cluster (--out must be a folder).")
    ] = "local",
    address: AddressOption = None,
) -> None:
    """Predict expression for stored tiles and write AnnData (scanpy/squidpy ready)."""
    from embedstore._schema import Col
    from embedstore.errors import BadInput
    from embedstore.prediction import predict as run_predict

    own = {"slide": Col.SLIDE_ID, "patient": Col.PATIENT}
    if exclude_own is not None and exclude_own not in own:
        msg = f"--exclude-own {exclude_own}: not a choice; use slide or patient"
        raise BadInput(msg)
    if engine == "ray" or out.suffix != ".h5ad":  # a cohort: one file per slide
        from embedstore.cohort_prediction import predict_cohort

        if out.suffix == ".h5ad":
            msg = f"--out {out}: --engine ray writes one .h5ad per slide into a folder; pass a folder"
            raise BadInput(msg)
        if plot or smooth:
            flag = "--plot: maps are drawn" if plot else "--smooth: smoothing is applied"
            msg = f"{flag} for one .h5ad --out; pass --out FILE.h5ad (with --slide) to get it"
            raise BadInput(msg)
        report = predict_cohort(
            index, store, out, slide_ids=slide, cohort=cohort, k=k, aggregator=aggregator,
            exclude_own=own.get(exclude_own), engine=engine, address=address,
        )  # fmt: skip
        typer.echo(report.summary())
        typer.echo(f"predictions -> {out}/<cohort>/<slide_id>.h5ad")
        if not report.ok:
            raise typer.Exit(1)
        return
    adata = run_predict(
        index, store, slide_ids=slide, cohort=cohort, k=k, aggregator=aggregator,
        exclude_own=own.get(exclude_own), out=out, plot=plot, smooth=smooth,
    )  # fmt: skip
    typer.echo(f"{adata.n_obs} tiles x {adata.n_vars} genes -> {out}")


@app.command()
def evaluate(
    reference: Annotated[Path, typer.Option(help="Reference ST data set.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for predictions, metrics.json, report.html.")],
    query: Annotated[Path | None, typer.Option(help="Query ST data set; omit for cross-validation.")] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder name; the built-in one by default.")] = None,
    weights: Annotated[str | None, typer.Option(help="Encoder weights (see embed).")] = None,
    store: Annotated[Path | None, typer.Option(help="Store to embed into; OUT/store by default.")] = None,
    k: Annotated[int, typer.Option(help="Neighbours for the kNN methods.")] = 50,
    n_genes: Annotated[int, typer.Option(help="Panel size (most variable genes of the reference).")] = 250,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    additions: Annotated[
        str, typer.Option(help="Comma-separated additions reported as paired gains: context, smooth, stain; or none.")
    ] = "context,smooth,stain",
) -> None:
    """Compare every method on the same embeddings, genes and leakage-free splits."""
    from embedstore.evaluation import evaluate as run_evaluate

    chosen = [] if additions.strip() == "none" else [a.strip() for a in additions.split(",") if a.strip()]
    result = run_evaluate(
        reference, out, query=query, encoder=encoder, weights=weights, store=store, k=k, n_genes=n_genes, seed=seed,
        additions=chosen,
    )  # fmt: skip
    typer.echo(result.table())
    typer.echo(f"report -> {result.report}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    data: Annotated[Path | None, typer.Option(help="A real ST data set instead of the synthetic one.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Run the whole pipeline offline: synthetic cohort (or --data), embed, align, index, predict, evaluate."""
    from embedstore.demo import demo as run_demo

    result = run_demo(out, data=data, seed=seed)
    typer.echo(result.table())
    typer.echo(f"report -> {result.report}")


def main() -> None:
    """Entry point: run the app, turning EmbedstoreError into one line and its exit code (2; 1 for a full disk)."""
    try:
        app()
    except EmbedstoreError as e:
        typer.echo(f"embedstore: error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        # A full disk hit outside embedstore's own writers (a log line, a library's cache).
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        typer.echo(f"embedstore: error: {e.filename or 'output'}: {e.strerror}; free space, then rerun", err=True)
        sys.exit(1)
