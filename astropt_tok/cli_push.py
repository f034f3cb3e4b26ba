"""`astropt push DIR --repo ORG/NAME`: flags -> PushConfig -> astropt_tok.store_hub.push_store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `push` command to the astropt app."""

    @app.command()
    def push(
        store: Path = typer.Argument(..., help="Token store folder (from `astropt tokenise`)."),
        repo: str = typer.Option(..., "--repo", help="Dataset repo on the Hugging Face hub, ORG/NAME (created if "
                                 "missing)."),
        private: bool = typer.Option(False, "--private", help="Create the repo private (an existing repo keeps "
                                     "its visibility)."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created from main if "
                                               "missing; default main)."),
    ) -> None:
        """Upload a complete, checked token store to a Hugging Face dataset repo (resumable: run it again after an
        interruption); others then train on it with --tokens hf://datasets/ORG/NAME."""
        from astropt_tok.store_hub import PushConfig, push_store

        result = push_store(PushConfig(store=store, repo=repo, private=private, revision=revision))
        checked = "every shard re-hashed" if result.verified else "sizes, columns and rows checked; run " \
            f"`astropt verify {store}` for every sha256"
        at = f"@{revision}" if revision else ""
        typer.echo(f"pushed {store} to {result.url} ({result.files} files, {result.bytes:,} bytes; {checked}); "
                   f"train on it with `astropt train --tokens hf://datasets/{repo}{at}`")
