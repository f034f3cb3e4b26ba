"""Tokenise benchmarks, each measured side by side with its baseline in one run (medians of repeats).

decode:    source decoding rows/s on the same parquet: this project's reader (row groups, checks, crop, batches)
           vs pyarrow direct (read_row_group of the image column + flatten to numpy, no checks; and the same
           reading only its band and flux leaves, as ours does), `datasets` Arrow batches, and the Python-dict
           path (`datasets` rows as dicts, as upstream's collate sees them).
encode:    end-to-end `tokenise` rows/s (all shard time, and after the first batch: without the readers'
           start-up) vs the codec alone on pre-loaded device tensors (the ceiling), same rows, codec, device,
           batch size and precision; the ceiling is the codec called as the pipeline calls it, and also as a
           plain AION call (which zeroes a [n, 9, 96, 96] tensor on the host per batch).
precision: codec-alone throughput per precision, and the fraction of tokens identical to fp32.
open_files: reading every row group with its files kept open (as the readers do) vs reopening per row group.
startup:   command start -> first batch encoded: a fresh process (interpreter, imports, CUDA, codec load,
           footers, reader processes, the first codec call) running `tokenise`; the median of --repeats.

--profile DIR (with encode) runs one more pipeline under torch.profiler and writes where the codec's thread
spent its time (the named ranges astropt.wait_for_batch / submit / collect, and every op) as a table, a
gzipped Chrome trace (open in https://ui.perfetto.dev) and, in the JSON, each range's total and the
fraction of the run the device was busy.

    python benchmarks/bench_tokenise.py --rows 512 decode
    python benchmarks/bench_tokenise.py --rows 48 --codec-size full --batch-size 16 encode
    python benchmarks/bench_tokenise.py --rows 4096 --codec-size full --device cuda --batch-size 256 encode precision
    python benchmarks/bench_tokenise.py --rows 2048 --device cuda --batch-size 256 --precision bf16 encode --profile prof
    python benchmarks/bench_tokenise.py --rows 2048 --device cuda --batch-size 256 --precision bf16 startup

Prints one JSON object per benchmark (and writes them to --json when given).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

BANDS = ["DES-G", "DES-R", "DES-I", "DES-Z"]


def timed(fn, repeats: int) -> tuple[float, int]:
    """(median seconds, rows) of `repeats` calls of fn() -> rows."""
    times, rows = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rows


def interleaved_rates(contenders: list[tuple[str, object]], repeats: int) -> dict[str, float]:
    """Median rows/s of each (name, fn() -> rows), the contenders run in turn `repeats` times so that machine
    noise hits all alike."""
    rates: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, fn in contenders:
            t, n = timed(fn, 1)
            rates.setdefault(name, []).append(n / t)
    return {name: statistics.median(r) for name, r in rates.items()}


def bench_decode(survey: Path, args) -> dict:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from astropt_tok.source import resolve_source
    from astropt_tok.stages import prepare_shards
    from astropt_tok.tokenise import TokeniseConfig

    files = sorted(str(p) for p in survey.glob("*.parquet"))
    plan = resolve_source(str(survey))

    def ours() -> int:
        cfg = TokeniseConfig(batch_size=args.batch_size, workers=args.workers)
        shards = prepare_shards(plan, [(0, 0, plan.num_rows)], cfg, pin=False)
        return sum(len(b.rows) for _, batches in shards for b in batches)

    def pyarrow_direct(columns=("legacysurvey_image",)) -> int:
        n = 0
        for f in files:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                col = pf.read_row_group(g, columns=list(columns)).column(0).combine_chunks()
                images = col.field("flux").flatten()
                images = images.storage if isinstance(images.type, pa.BaseExtensionType) else images
                n += images.flatten().flatten().to_numpy().reshape(-1, 4, 160, 160).shape[0]
        return n

    def pyarrow_direct_flux_leaves() -> int:
        return pyarrow_direct(("legacysurvey_image.band", "legacysurvey_image.flux"))

    def datasets_arrow_batches() -> int:
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        ds = ds.select_columns(["legacysurvey_image"]).with_format("arrow")
        n = 0
        for table in ds.iter(batch_size=args.batch_size):
            images = table.column(0).combine_chunks().field("flux").flatten()
            images = images.storage if isinstance(images.type, pa.BaseExtensionType) else images
            n += images.flatten().flatten().to_numpy().reshape(-1, 4, 160, 160).shape[0]
        return n

    def python_dicts() -> int:
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        n = 0
        for row in ds.select_columns(["legacysurvey_image"]):
            np.asarray(row["legacysurvey_image"]["flux"], dtype=np.float32)
            n += 1
        return n

    contenders = [("ours", ours), ("pyarrow_direct", pyarrow_direct),
                  ("pyarrow_direct_flux_leaves", pyarrow_direct_flux_leaves),
                  ("datasets_arrow_batches", datasets_arrow_batches), ("python_dicts", python_dicts)]
    for name, fn in contenders:
        fn()  # warm the page cache and imports
    med = interleaved_rates(contenders, args.repeats)
    return {"benchmark": "decode", "rows": plan.num_rows, "workers": args.workers, "rows_per_s": med,
            "ours_vs_pyarrow_direct": med["ours"] / med["pyarrow_direct"],
            "ours_vs_pyarrow_direct_flux_leaves": med["ours"] / med["pyarrow_direct_flux_leaves"],
            "ours_vs_python_dicts": med["ours"] / med["python_dicts"]}


def bench_open_files(survey: Path, args) -> dict:
    """Reading every row group of the survey with its files kept open (`OpenFiles`, as the readers do) vs
    opening the file again for each row group (parsing its footer each time)."""
    from astropt_tok.source import OpenFiles, read_task, read_tasks, resolve_source

    plan = resolve_source(str(survey))
    tasks = read_tasks(plan, 0, plan.num_rows)

    def kept_open() -> int:
        files = OpenFiles()
        try:
            return sum(read_task(plan, t, files).num_rows for t in tasks)
        finally:
            files.close()

    def reopened() -> int:
        return sum(read_task(plan, t).num_rows for t in tasks)

    med = interleaved_rates([("kept_open", kept_open), ("reopened", reopened)], args.repeats)
    return {"benchmark": "open_files", "rows": plan.num_rows, "files": len(plan.files), "row_groups": len(tasks),
            "rows_per_s": med, "kept_open_vs_reopened": med["kept_open"] / med["reopened"]}


def _survey_flux(survey: Path, rows: int) -> "np.ndarray":
    from astropt_tok.source import batch_to_flux, iter_row_range, resolve_source

    plan = resolve_source(str(survey))
    parts = [batch_to_flux(b, plan.column, BANDS)[0] for _, b in iter_row_range(plan, 0, min(rows, plan.num_rows))]
    return np.concatenate(parts)


def codec_alone(loaded, flux, batch_size: int, device: str, precision: str, plain: bool = False) -> tuple[float, np.ndarray]:
    """(rows/s, tokens) of the codec on tensors already on the device (inputs copied per batch, since encode
    clamps in place): the ceiling for the pipeline. By default the codec is called as the pipeline's Encoder
    calls it (device as the default device); `plain` calls AION's encode as its own examples do."""
    import torch
    from aion.modalities import LegacySurveyImage

    from astropt_tok.encoder import Encoder

    x_all = torch.from_numpy(flux).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    from astropt_tok.executor import tf32_allowed

    encoder = Encoder(loaded, device, precision, BANDS)  # sets TF32 for `precision` inside each of its calls
    codec = loaded.codec
    out = []

    def run():
        out.clear()
        for i in range(0, len(x_all), batch_size):
            x = x_all[i:i + batch_size].clone()
            if plain:
                with torch.inference_mode(), tf32_allowed(precision == "tf32"), \
                        torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                    out.append(codec.encode(LegacySurveyImage(flux=x, bands=BANDS)))
            else:
                out.append(encoder.encode_on_device(x)[0])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return len(x_all)

    t, n = timed(run, 1)
    return n / t, torch.cat(out).cpu().numpy()


def bench_encode(survey: Path, codec_dir: Path, args) -> dict:

    from astropt_tok.codec import load_image_codec
    from astropt_tok.executor import resolve_device
    from astropt_tok.tokenise import TokeniseConfig, tokenise

    device = resolve_device(args.device)
    loaded = load_image_codec(str(codec_dir), device=device)
    flux = _survey_flux(survey, args.rows)
    for plain in (False, True):  # warm-up
        codec_alone(loaded, flux[: args.batch_size], args.batch_size, device, args.precision, plain)
    pipe, steady, waiting, alone, plain_alone = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so machine noise hits all alike
            alone.append(codec_alone(loaded, flux, args.batch_size, device, args.precision)[0])
            plain_alone.append(codec_alone(loaded, flux, args.batch_size, device, args.precision, True)[0])
            cfg = TokeniseConfig(source=str(survey), out=f"{tmp}/tok{r}", shards=args.shards, codec=str(codec_dir),
                                 batch_size=args.batch_size, device=device, workers=args.workers, limit=args.rows,
                                 precision=args.precision, progress=False)
            summary = tokenise(cfg)
            pipe.append(summary.rows / summary.work_s)
            steady.append(summary.rows / summary.steady_s)
            waiting.append(summary.input_wait_s / summary.steady_s)
        profiled = profile_pipeline(survey, codec_dir, device, args, f"{tmp}/profiled") if args.profile else {}
    med = statistics.median
    return {**profiled, "benchmark": "encode", "rows": len(flux), "device": device, "precision": args.precision,
            "codec_size": args.codec_size, "batch_size": args.batch_size, "workers": args.workers,
            "shards": args.shards,
            "pipeline_rows_per_s": med(pipe), "pipeline_after_first_batch_rows_per_s": med(steady),
            "codec_waiting_for_input_fraction": med(waiting),
            "codec_alone_rows_per_s": med(alone), "codec_alone_plain_aion_call_rows_per_s": med(plain_alone),
            "pipeline_vs_codec_alone": med(pipe) / med(alone),
            "pipeline_after_first_batch_vs_codec_alone": med(steady) / med(alone),
            "codec_alone_vs_plain_aion_call": med(alone) / med(plain_alone)}


def profile_pipeline(survey: Path, codec_dir: Path, device: str, args, out: str) -> dict:
    """One pipeline run under torch.profiler: a table and a gzipped Chrome trace in --profile DIR, and the
    totals of the codec thread's named ranges plus the fraction of the run the device was busy."""
    from torch.profiler import ProfilerActivity, profile

    from astropt_tok.tokenise import TokeniseConfig, tokenise

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    cfg = TokeniseConfig(source=str(survey), out=out, shards=args.shards, codec=str(codec_dir),
                         batch_size=args.batch_size, device=device, workers=args.workers,
                         limit=min(args.rows, args.profile_rows), precision=args.precision, progress=False)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        summary = tokenise(cfg)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    name = f"{args.precision}_{args.batch_size}"
    args.profile.mkdir(parents=True, exist_ok=True)
    with open(args.profile / f"profile_{name}.txt", "w") as f:
        for key in ("cpu_time_total", "self_cpu_time_total") + (("self_cuda_time_total",) if len(activities) > 1 else ()):
            f.write(f"# sorted by {key}\n{events.table(sort_by=key, row_limit=40)}\n\n")
    trace = args.profile / f"trace_{name}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    ranges = {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith("astropt.")}
    kernels_s = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events) / 1e6
    return {"profile": {"rows": summary.rows, "wall_s": wall, "work_s": summary.work_s, "ranges_s": ranges,
                        "device_busy_fraction_of_work": kernels_s / summary.work_s if len(activities) > 1 else None,
                        "files": sorted(p.name for p in args.profile.glob(f"*{name}*"))}}


def bench_startup(survey: Path, codec_dir: Path, args) -> dict:
    """Seconds from launching a fresh `tokenise` process to its first batch's tokens being back."""
    from astropt_tok.executor import resolve_device

    child = ("import json, sys, time\n"
             "from astropt_tok.tokenise import TokeniseConfig, tokenise\n"
             "cfg = TokeniseConfig(**json.loads(sys.argv[1]))\n"
             "t_call = time.time()\n"
             "s = tokenise(cfg)\n"
             "print(json.dumps({'first_encoded_at': t_call + s.first_encoded_s, 'import_s': t_call - T0}))\n")
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    device = resolve_device(args.device)
    startup, imports = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cfg = dict(source=str(survey), out=f"{tmp}/tok{r}", shards=args.shards, codec=str(codec_dir),
                       batch_size=args.batch_size, device=device, workers=args.workers, limit=args.rows,
                       precision=args.precision, progress=False)
            t0 = time.time()
            done = subprocess.run([sys.executable, "-c", f"import time; T0 = time.time()\n{child}", json.dumps(cfg)],
                                  env=env, capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise SystemExit(f"startup run failed: {done.stderr[-2000:]}")
            res = json.loads(done.stdout.strip().splitlines()[-1])
            startup.append(res["first_encoded_at"] - t0)
            imports.append(res["import_s"])
    med = statistics.median
    return {"benchmark": "startup", "device": device, "precision": args.precision, "codec_size": args.codec_size,
            "batch_size": args.batch_size, "workers": args.workers, "rows": args.rows,
            "command_start_to_first_batch_encoded_s": med(startup), "of_which_imports_s": med(imports),
            "runs_s": startup}


def bench_precision(survey: Path, codec_dir: Path, args) -> dict:
    from astropt_tok.codec import load_image_codec
    from astropt_tok.executor import resolve_device

    device = resolve_device(args.device)
    loaded = load_image_codec(str(codec_dir), device=device)
    flux = _survey_flux(survey, args.rows)
    out = {"benchmark": "precision", "rows": len(flux), "device": device, "codec_size": args.codec_size,
           "batch_size": args.batch_size, "rows_per_s": {}, "identical_to_fp32": {}}
    reference = None

    def measure(name: str, precision: str) -> None:
        nonlocal reference
        codec_alone(loaded, flux[: args.batch_size], args.batch_size, device, precision)  # warm-up
        rates, tokens = [], None
        for _ in range(args.repeats):
            rate, tokens = codec_alone(loaded, flux, args.batch_size, device, precision)
            rates.append(rate)
        out["rows_per_s"][name] = statistics.median(rates)
        if reference is None:
            reference = tokens
        out["identical_to_fp32"][name] = float((tokens == reference).mean())

    for precision in ("fp32", "tf32", "bf16"):
        measure(precision, precision)
    if args.channels_last:  # an experiment, not (yet) a tokenise option: NHWC weights for the codec's convolutions
        import torch

        loaded.codec.to(memory_format=torch.channels_last)
        try:
            measure("bf16_channels_last", "bf16")
        finally:
            loaded.codec.to(memory_format=torch.contiguous_format)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="+", choices=["decode", "encode", "precision", "open_files", "startup"])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--row-group-size", type=int, default=64, help="of the synthetic survey")
    ap.add_argument("--survey", type=Path, help="existing survey folder (default: write a synthetic one)")
    ap.add_argument("--codec", type=Path, help="codec folder in the hub layout (default: a random one)")
    ap.add_argument("--codec-size", choices=["tiny", "full"], default="full")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2, help="processes writing the synthetic survey")
    ap.add_argument("--channels-last", action="store_true",
                    help="precision: also time bf16 with the codec's weights in channels-last layout")
    ap.add_argument("--profile", type=Path, help="encode: also profile one pipeline run, files into this folder")
    ap.add_argument("--profile-rows", type=int, default=1024, help="rows of the profiled run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from astropt_tok.codec import make_random_codec
    from astropt_tok.synthetic import write_synthetic_survey

    with tempfile.TemporaryDirectory() as tmp:
        survey = args.survey
        if survey is None:
            survey = Path(tmp) / "survey"
            write_synthetic_survey(survey, n_rows=args.rows, n_files=args.files, seed=7, row_group_size=args.row_group_size,
                                   processes=args.processes)
        codec_dir = args.codec or make_random_codec(Path(tmp) / "codec", args.codec_size)
        results = []
        for which in args.which:
            if which == "decode":
                r = bench_decode(survey, args)
            elif which == "open_files":
                r = bench_open_files(survey, args)
            elif which == "encode":
                r = bench_encode(survey, codec_dir, args)
            elif which == "startup":
                r = bench_startup(survey, codec_dir, args)
            else:
                r = bench_precision(survey, codec_dir, args)
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.json:
        from astropt_tok.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))  # whole or not at all


if __name__ == "__main__":
    main()
