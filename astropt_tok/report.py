"""Human-readable summaries: a token store (`astropt info`), a tokenise run, reconstruction quality.

Every command prints through `output_console()`: on a terminal, its width; in a pipe or a log file (where rich
would assume 80 columns, or $COLUMNS), PIPE_WIDTH, so a path, object id or modality name prints whole on one
line (grep-able) instead of folded across lines. Tables fold long cells rather than cut them, on a narrow
terminal too."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

PIPE_WIDTH = 400  # columns of output that is not a terminal (a table takes only the width its cells need)


def output_console(stderr: bool = False) -> Console:
    """The console a command prints to: the terminal's width, or PIPE_WIDTH in a pipe or a log file."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PIPE_WIDTH)  # $COLUMNS too is ignored: exported by many shells and CI


def _column_line(m: dict) -> str:
    """What `info` says of one token column: an image column's bands, or a scalar's or spectrum's AION modality,
    codec and tokens (format version 4); and its source column."""
    source = f"source column {m.get('column', m['name'])}"
    if m.get("kind", "image") == "image":
        return f"bands {','.join(m['bands'])}; {source}"
    codec = m.get("codec") or {}
    return (f"{m['kind']} {m.get('aion_modality')} ({codec.get('class')}, {m.get('vocab_size')} codes, "
            f"{m.get('tokens_per_object')} token{'s' if m.get('tokens_per_object') != 1 else ''}); {source}")


def print_store_info(store_dir: str | Path, console: Console | None = None) -> dict:
    """Print a summary table of a store and return the figures shown."""
    from astropt_tok.store import REJECTS, TokenStore, codebook_usage, read_manifest

    console = console or output_console()
    manifest = read_manifest(store_dir)
    if not manifest.get("complete"):
        from astropt_tok.store import read_done_records

        n = manifest["sharding"]["num_shards"]
        done = read_done_records(store_dir, n)
        console.print(f"[yellow]incomplete store[/]: {len(done)} of {n} shards done")
        return {"complete": False, "shards_done": len(done), "num_shards": n}
    store = TokenStore(store_dir)
    used, _ = codebook_usage(store)
    src = manifest["source"]
    # a store of several image columns: each with its own bands and source column (`store.bands` are the first's;
    # one codec made every column's tokens)
    columns = {f"column {m['name']}": _column_line(m) for m in manifest.get("modalities") or []}
    figures = {
        "rows": store.num_rows,
        "shards": len(store.shards),
        "storage": store.storage,
        "codec": store.codec_id,
        "vocab_size": store.vocab_size,
        "tokens_per_image": store.tokens_per_image,
        "dtype": str(store.dtype),
        **({"modalities": ", ".join(store.modalities) + (" (rows may lack some: <name>_valid)" if store.partial
                                                          else ""), **columns} if columns
           else {"bands": ",".join(store.bands)}),
        "precision": manifest.get("precision"),
        "source": f"{src.get('id')} ({src.get('split', '-')}, {src.get('column', '-')})" if not columns
        else f"{src.get('id')} ({src.get('split', '-')})",
        "rejected": manifest["totals"]["rejected"],
        "codebook_used": f"{used} of {store.vocab_size} ({100 * used / store.vocab_size:.1f}%)",
        "bytes": sum(s["bytes"] for s in store.shards),
    }
    table = folding_table("what", "value", title=f"token store {store_dir}", show_header=False)
    for k, v in figures.items():
        table.add_row(k, str(v))
    console.print(table)
    rejects = Path(store_dir) / REJECTS
    if figures["rejected"] and rejects.is_file():
        console.print(f"rejected rows are listed in {rejects}")
    return figures


def print_tokenise_summary(summary, console: Console | None = None) -> None:
    """The closing table of a tokenise run."""
    console = console or output_console()
    table = folding_table("what", "value", title=f"tokenise -> {summary.out}", show_header=False)
    skipped = sum(r.skipped for r in summary.results)
    table.add_row("shards (this process)", f"{len(summary.my_shards)} of {summary.num_shards} ({skipped} already done)")
    table.add_row("rows written", f"{summary.rows:,}")
    table.add_row("rows rejected", f"{summary.rejected:,}")
    table.add_row("throughput", f"{summary.rows_per_s:,.1f} rows/s on {summary.device} ({summary.precision})")
    table.add_row("wall time", f"{summary.seconds:,.1f} s")
    if summary.work_s:
        waited, steady = summary.input_wait_s, summary.steady_s
        hint = " (more than a tenth: raise --workers)" if waited > 0.1 * steady else ""
        table.add_row("codec waiting for input",
                      f"{waited:,.1f} s of {steady:,.1f} s{hint}; start-up {summary.first_batch_s:,.1f} s")
        table.add_row("first batch encoded", f"{summary.first_encoded_s:,.1f} s after the start (codec loaded, "
                      "readers started)")
    table.add_row("store", "complete" if summary.complete else "incomplete: other processes' shards are not all done yet")
    console.print(table)


def folding_table(*columns: str, **kwargs) -> Table:
    """A rich Table whose cells wrap (fold) rather than end in an ellipsis when the console is narrow; as wide
    as its title at least (a title holding a path wraps only where the console itself is narrower)."""
    if kwargs.get("title") and "min_width" not in kwargs:
        kwargs["min_width"] = len(str(kwargs["title"]))
    table = Table(**kwargs)
    for name in columns:
        table.add_column(name, overflow="fold")
    return table


RECONSTRUCTION_ROWS = (("codec", None), ("all-zero", "zero"), ("image mean", "image_mean"))


def print_reconstruction_table(report: dict, title: str, console: Console | None = None) -> None:
    """Per band: MSE, explained variance and PSNR of the codec's reconstruction and of the two baselines.

    `report` is astropt_tok.quality.summary_json's {"per_band", "baselines"}.
    """
    console = console or output_console()
    table = folding_table("band", "reconstruction", "MSE", "explained var.", "PSNR dB", title=title,
                          caption="explained var. pooled over galaxies (1 = perfect, 0 = each image's mean); "
                                  "MSE and PSNR: mean over images, PSNR range = max - min of each original")
    for col in table.columns[2:]:
        col.justify = "right"
    for band in report["per_band"]:
        for i, (name, key) in enumerate(RECONSTRUCTION_ROWS):
            m = report["per_band"][band] if key is None else report["baselines"][key][band]
            table.add_row(band if i == 0 else "", name, f"{m['mse']:.3g}", f"{m['explained_variance']:.3f}",
                          f"{m['psnr']:.1f}", end_section=i == len(RECONSTRUCTION_ROWS) - 1)
    console.print(table)
    if report.get("colours"):  # reports written before colours were scored have none
        console.print(colour_line("colour RMS error, mag (this / one colour for all)", report["colours"]))


def colour_line(title: str, colours: dict) -> str:
    """astropt_tok.quality.colour_scores as one line: 'title: g-r 0.12 / 0.30, ... (N galaxies)'."""
    n = next(iter(colours.values()))["galaxies"] if colours else 0
    return f"{title}: " + ", ".join(f"{name} {_mag(c['rms_mag'])} / {_mag(c['baseline_rms_mag'])}"
                                    for name, c in colours.items()) + f" ({n} galaxies)"


def _mag(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def report_verify(problems: list[str], folder) -> None:
    """A verify's outcome: one `BAD` line per problem on stderr and exit 1, else one `OK` line."""
    import typer

    for line in problems:
        typer.echo(f"BAD {line}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"OK {folder}: every shard matches its manifest")
