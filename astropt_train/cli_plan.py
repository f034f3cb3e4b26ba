"""`astropt plan`: flags -> PlanConfig -> astropt_train.plan.plan, printed as a table or JSON.

Imports only typer and the standard library at the top, so `astropt --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `plan` command to the astropt app."""

    @app.command("plan")
    def plan_command(
        preset: Optional[str] = typer.Option(None, "--preset", help="Model size, as `train --preset` (default: "
                                             "every preset, one row each)."),
        n_layer: Optional[int] = typer.Option(None, "--n-layer", help="Transformer blocks (overrides the preset)."),
        n_head: Optional[int] = typer.Option(None, "--n-head", help="Attention heads (overrides the preset)."),
        n_embd: Optional[int] = typer.Option(None, "--n-embd", help="Embedding width (overrides the preset)."),
        gpus: int = typer.Option(8, "--gpus", help="GPUs (ranks) the model is trained on: FSDP shards over them."),
        gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="Memory of each GPU in GiB."),
        batch_size: int = typer.Option(8, "--batch-size", help="Images per micro-batch per GPU."),
        dtype: str = typer.Option("bf16", "--dtype", help="Compute dtype, as `train --dtype`: bf16, fp16 or fp32."),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Positions per galaxy (576: one AION image)."),
        vocab: Optional[int] = typer.Option(None, "--vocab", help="Vocabulary (4375: AION's image codec)."),
        tokens: Optional[Path] = typer.Option(None, "--tokens", help="Token store whose vocabulary, tokens per "
                                              "image and modalities to plan for (instead of --seq-len/--vocab)."),
        head: str = typer.Option("affine", "--head", help="Head to vocab logits, as `train --head`: affine or aim."),
        loss_chunks: int = typer.Option(1, "--loss-chunks", help="As `train --loss-chunks`: the logits made N "
                                        "chunks at a time."),
        json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON (bytes)."),
    ) -> None:
        """Memory per GPU of training a model under DDP and FSDP, with and without activation checkpointing, and the largest batch that fits (arithmetic: no GPU needed).

        GiB per rank: params, grads, optimiser, activations at --batch-size, overhead; the assumptions: plan.py.
        """
        from astropt_tok.report import output_console

        from astropt_train.plan import PlanConfig, plan, plan_table, presets_table

        cfg = PlanConfig(preset=preset, n_layer=n_layer, n_head=n_head, n_embd=n_embd, gpus=gpus,
                         gpu_memory=gpu_memory, batch_size=batch_size, dtype=dtype, seq_len=seq_len, vocab=vocab,
                         tokens=None if tokens is None else str(tokens), head=head, loss_chunks=loss_chunks)
        plans = plan(cfg)
        if json_out:
            from astropt_tok.health import dumps_finite

            typer.echo(dumps_finite([p.to_dict() for p in plans], indent=2))
            return
        console = output_console()
        console.print(plan_table(plans[0]) if len(plans) == 1 else presets_table(plans))
