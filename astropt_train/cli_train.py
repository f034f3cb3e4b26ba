"""`astropt train`: flags (and an optional TOML file) -> TrainConfig -> astropt_train.loop.train.

Imports only typer and the standard library at the top, so `astropt --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `train` command to the astropt app."""

    @app.command()
    def train(
        tokens: Optional[Path] = typer.Option(None, "--tokens", help="Token store folder (from `astropt tokenise`), or "
                                              "hf://datasets/ORG/NAME[@revision] (from `astropt push`)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/astropt)."),
        config: Optional[Path] = typer.Option(None, "--config", help="TOML file of settings; flags override it."),
        preset: Optional[str] = typer.Option(None, "--preset", help="Model size: tiny, small, 001M, 005M, 010M, "
                                             "020M, 95M, 300M, 700M, 2100M, 2100M-32L (default tiny)."),
        n_layer: Optional[int] = typer.Option(None, "--n-layer", help="Transformer blocks (overrides the preset)."),
        n_head: Optional[int] = typer.Option(None, "--n-head", help="Attention heads (overrides the preset)."),
        n_embd: Optional[int] = typer.Option(None, "--n-embd", help="Embedding width (overrides the preset)."),
        init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from these weights (shape, head "
                                                "and vocabulary too): a run or checkpoint folder, or upstream "
                                                "AstroPT's ckpt.pt (a vocabulary larger than the store's is fine)."),
        head: Optional[str] = typer.Option(None, "--head", help="Head to vocab logits: affine (one Linear) or aim "
                                           "(Linear to 4 x width, GELU, Linear), upstream AstroPT's two (affine)."),
        modalities: Optional[str] = typer.Option(None, "--modalities", help="A store of several token columns "
                                                 "(images, scalars, spectra): which to train on, in sequence order, "
                                                 "e.g. legacysurvey_image,hsc_image (all, in the store's order)."),
        shuffle_modalities: Optional[bool] = typer.Option(None, "--shuffle-modalities", help="Draw each galaxy's "
                                                          "modality order anew each epoch, from (seed, epoch, row), "
                                                          "instead of one fixed order (validation: each row's epoch-0 "
                                                          "order)."),
        loss_weight: Optional[list[str]] = typer.Option(None, "--loss-weight", help="NAME=W: weigh modality "
                                                        "NAME's targets W times in the loss (repeatable; others 1), "
                                                        "e.g. Z=100 so one redshift token counts beside 576 image "
                                                        "tokens."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per micro-batch per process (16)."),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimiser step (1)."),
        max_iters: Optional[int] = typer.Option(None, "--max-iters", help="Optimiser steps in total (1000)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (6e-4)."),
        warmup_iters: Optional[int] = typer.Option(None, "--warmup-iters", help="Linear warmup steps (100)."),
        lr_decay_iters: Optional[int] = typer.Option(None, "--lr-decay-iters", help="Cosine length (max-iters)."),
        min_lr: Optional[float] = typer.Option(None, "--min-lr", help="Final learning rate (lr/10)."),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (0.1)."),
        eval_interval: Optional[int] = typer.Option(None, "--eval-interval", help="Steps between evaluations (200)."),
        eval_iters: Optional[int] = typer.Option(None, "--eval-iters", help="Validation batches per eval (20)."),
        val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Rows held out (0.05)."),
        val_images: Optional[int] = typer.Option(None, "--val-images", help="Galaxies drawn per eval; 0: none (4)."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cuda or cpu (auto)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 on CUDA (bf16)."),
        compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile (on for CUDA)."),
        deterministic: Optional[bool] = typer.Option(None, "--deterministic", help="Deterministic kernels: on a "
                                                     "GPU, reruns and resumed runs give bit-identical losses "
                                                     "(a little slower; see BENCHMARKS.md). CPU runs always do."),
        loss_chunks: Optional[int] = typer.Option(None, "--loss-chunks", help="Compute the loss N chunks of "
                                                  "positions at a time, remaking the logits in backward instead of "
                                                  "keeping them: less memory, one more head matmul (1: plain)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for init, split and data order (1337)."),
        resume: Optional[bool] = typer.Option(None, "--resume", help="Continue from the newest checkpoint in --out."),
        codec: Optional[str] = typer.Option(None, "--codec", help="Codec id or folder for validation images "
                                            "(default: the store's)."),
        accept_codec_change: Optional[bool] = typer.Option(None, "--accept-codec-change", help="Draw validation "
                                                           "images with a codec whose weights differ from those that "
                                                           "made the store (refitted since); refused without it."),
        log: Optional[str] = typer.Option(None, "--log", help="csv, wandb or tensorboard (csv)."),
        workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers (0 on CPU, 2 on CUDA)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads (default: torch's, all "
                                              "cores: fastest for training on an idle machine; 1 can be faster on a busy one)."),
        store_reads: Optional[str] = typer.Option(None, "--store-reads", help="pread: one read per row, memory "
                                                  "flat however large the store; mmap: through the memory maps, "
                                                  "RSS grows toward the store's size (pread)."),
        parallel: Optional[str] = typer.Option(None, "--parallel", help="Under torchrun: ddp (every rank holds the "
                                               "whole model) or fsdp (parameters, gradients and AdamW state sharded "
                                               "across ranks, per block: for models that do not fit one GPU) (ddp)."),
        activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing", help="Recompute "
                                                                "each block's activations in backward instead of "
                                                                "keeping them: much less memory, about a third more "
                                                                "compute (off)."),
        checkpoint_format: Optional[str] = typer.Option(None, "--checkpoint-format", help="full (rank 0 writes the "
                                                        "whole model) or sharded (every rank writes its shards; "
                                                        "resumes with another process count) (sharded under fsdp, "
                                                        "else full)."),
        save_consolidated: Optional[bool] = typer.Option(None, "--save-consolidated", help="Sharded checkpoints also "
                                                         "get a model.safetensors of the whole model (gathered "
                                                         "to rank 0)."),
        checkpoint_interval: Optional[int] = typer.Option(None, "--checkpoint-interval",
                                                          help="Steps between checkpoints; 0: only at the end (1000)."),
        keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Checkpoints kept, plus the best (3)."),
        log_interval: Optional[int] = typer.Option(None, "--log-interval", help="Steps between log lines (10)."),
        dist_timeout: Optional[float] = typer.Option(None, "--dist-timeout", help="Under torchrun: seconds each "
                                                     "rank waits for the others to join, and the limit of each "
                                                     "collective step; rank 0's checkpoint writes are not "
                                                     "limited by it (600)."),
    ) -> None:
        """Train an AstroPT GPT on a token store; checkpoints, metrics.jsonl and images go to --out.

        Several GPUs: torchrun --nproc_per_node N -m astropt_tok train --tokens DIR ...
        """
        from astropt_train.config import build_config
        from astropt_train.loop import train as run_training

        overrides = {k: v for k, v in locals().items() if k not in ("config", "build_config", "run_training")}
        for k in ("tokens", "out"):
            if overrides[k] is not None:
                overrides[k] = str(overrides[k])
        overrides["loss_weight"] = ",".join(loss_weight) if loss_weight else None  # repeated flags: one field
        cfg = build_config(overrides, config_file=config)
        summary = run_training(cfg)
        if summary["rank"] != 0:
            return
        if summary.get("already_finished"):
            typer.echo(f"run already finished at step {summary['step']}; raise --max-iters to continue "
                       f"(checkpoint {summary['checkpoint']})")
        elif summary.get("stopped"):
            pass  # the loop has already said where it stopped and how to continue
        else:
            best = summary["best_val_loss"]
            typer.echo(f"done: step {summary['step']}, loss {summary['loss']:.4f}"
                       + (f", best val loss {best:.4f}" if best is not None else "")
                       + f", {summary['tokens_per_s']:,.0f} tokens/s; checkpoint {summary['checkpoint']}")

    @app.command("runs")
    def runs(
        run_dirs: list[Path] = typer.Argument(..., help="Run folders written by `astropt train --out RUN`."),
        out: Optional[Path] = typer.Option(None, "--out", help="Draw every run's loss curves in this one PNG."),
    ) -> None:
        """Compare training runs: steps, best validation loss, tokens/s and last checkpoint, and their loss curves."""
        from astropt_tok.report import output_console

        from astropt_train.runs import plot_runs, runs_table, summarise_run

        summaries = [summarise_run(r) for r in run_dirs]
        output_console().print(runs_table(summaries))
        if out is not None:
            typer.echo(f"wrote {plot_runs(summaries, out)}")
