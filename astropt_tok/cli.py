"""The `astropt` command line: flags become a config dataclass, then one library call does the work.

Only typer is imported at start-up; torch, aion, datasets and pyarrow load inside the commands,
so `astropt --help` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from astropt_tok.errors import AstroptError, Interrupted

app = typer.Typer(
    name="astropt",
    help="Encode a survey once with the AION image codec into a sharded token store, "
    "train AstroPT-style GPTs on it, and decode tokens back to galaxies.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def verify(
    store: Path = typer.Argument(..., help="Token store folder (holds manifest.json) or hf://datasets/ORG/NAME"
                                 "[@revision], or an embeddings store written by `astropt embed`."),
    finalize: bool = typer.Option(
        False, "--finalize", help="Complete the manifest of a token store whose shards were all written by "
        "separate processes (under the store's lock), then verify it."),
) -> None:
    """Re-hash every shard against the manifest; check shapes, dtypes and token ranges. Non-zero exit names each bad shard."""
    from astropt_tok.report import report_verify
    from astropt_tok.store import manifest_format, verify_store
    from astropt_tok.tokenise import finalize as finalize_store
    from astropt_tok.store_hub import resolve_store
    from astropt_train.use.embed import FORMAT as EMBEDDINGS, verify_embeddings

    store = resolve_store(store, verify=False)  # hf://: its snapshot in the HF cache, verified just below
    if manifest_format(store) == EMBEDDINGS:
        if finalize:
            raise AstroptError(f"{store} is an embeddings store: --finalize is for token stores (re-run the same "
                               "`astropt embed` command to finish an embeddings store)")
        report_verify(verify_embeddings(store), store)
        return
    if finalize:
        finalize_store(store)
    report_verify(verify_store(store), store)


@app.command()
def info(store: Path = typer.Argument(..., help="Token store folder (holds manifest.json) or hf://datasets/ORG/"
                                      "NAME[@revision], or any folder an astropt command made (run, checkpoint, "
                                      "codec, export, demo, probe report).")) -> None:
    """Summarise a token store: rows, shards, codec, vocabulary, rejects and codebook usage; of any other artifact,
    its kind and lineage (what made it)."""
    from astropt_tok.report import print_store_info
    from astropt_tok.store import manifest_format
    from astropt_tok.store_hub import resolve_store
    from astropt_train.use.embed import FORMAT as EMBEDDINGS

    store = resolve_store(store)
    if manifest_format(store) == EMBEDDINGS:
        raise AstroptError(f"{store} is an embeddings store (from `astropt embed`): `astropt info` summarises token "
                           f"stores; check it with `astropt verify {store}`")
    if store.is_dir() and not (store / "manifest.json").exists():  # another kind of artifact: what made it
        from astropt_tok.artifacts import lineage_lines

        typer.echo("\n".join(lineage_lines(store)))
        return
    print_store_info(store)


def _register_subcommands() -> None:
    # Each package owns its commands; their modules import only typer at the top.
    from astropt_tok.cli_tokenise import register as register_tokenise

    from astropt_tok.cli_fit_codec import register as register_fit_codec
    from astropt_tok.cli_push import register as register_push

    register_tokenise(app)
    register_fit_codec(app)
    register_push(app)
    for module in ("astropt_train.cli_train", "astropt_train.cli_plan", "astropt_train.use.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register_subcommands()


def _plain_metavars(command) -> None:
    """Help shows no type for on/off flags and click's plain words (TEXT, INTEGER, PATH) for values, not <bool>/<str>."""
    words = {"bool": "", "str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH"}
    for param in getattr(command, "params", []):
        if getattr(param, "param_type_name", "") == "option" and param.metavar is None:
            kind = param.bare_type() if hasattr(param, "bare_type") else "str"
            param.metavar = "" if getattr(param, "is_flag", False) else words.get(kind, kind.upper())
    make_help_option = command.get_help_option

    def help_option(ctx):  # click makes --help per call; it is a flag too
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)


def build_command():
    """The click command behind `astropt`, with plain help metavars."""
    command = typer.main.get_command(app)
    _plain_metavars(command)
    return command


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    try:
        # click returns an Exit's code instead of exiting
        code = build_command().main(args=argv, prog_name="astropt", standalone_mode=False)
    except Interrupted as exc:  # Ctrl-C in a command that says what it kept and how to go on
        typer.echo(f"interrupted: {exc}", err=True)
        sys.exit(130)
    except AstroptError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and the like (from click, or the copy newer typers vendor)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError" or not callable(getattr(exc, "format_message", None)):
                exc.show()  # the help asked for by a bare command, or an error that is not a usage error
            else:  # a bad flag value or a missing or unknown flag: one line, like every other error
                where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                typer.echo(f"error: {exc.format_message().rstrip('.')}{where}", err=True)
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        raise
    if code == 130:  # typer turns a KeyboardInterrupt inside a command into this exit code, silently
        typer.echo("interrupted", err=True)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
