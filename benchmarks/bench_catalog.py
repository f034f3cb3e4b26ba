"""What catalogue scalars and spectra add to a tokenise run: the same survey tokenised with its images alone,
with its five scalar columns beside them (redshift, FLUX_G..FLUX_Z), and with those plus its DESI-like
spectrum, in one pass each (the same row groups read once; only the needed leaves). Runs alternate, and the
medians of --repeats runs are printed with the ratio to images alone, and the bytes of the source each run
reads (parquet column chunks of the columns asked).

Uses the shipped demo codec folder (a tiny image codec, the fitted scalar codecs and the tiny spectrum codec),
so it measures the pipeline's overhead, not a full-size codec's arithmetic (the image codec dominates a GPU
run; see BENCHMARKS.md).

With --loader, also the trainer's DataLoader over two stores of --loader-rows rows: one image column (576 tokens
a galaxy) against the same image column beside a redshift, four fluxes (1 token each) and a spectrum (273
tokens, AION's count): blocks of unequal length concatenated per row (pread reads, 0 workers, batch 32),
tokens/s and galaxies/s, medians of --repeats.

    python benchmarks/bench_catalog.py --rows 512 --repeats 3        # prints one JSON object
    python benchmarks/bench_catalog.py --loader-only --loader-rows 100000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCALARS = (("redshift", "Z"), ("FLUX_G", "LegacySurveyFluxG"), ("FLUX_R", "LegacySurveyFluxR"),
           ("FLUX_I", "LegacySurveyFluxI"), ("FLUX_Z", "LegacySurveyFluxZ"))
SPECTRA = (("desi_spectrum", "DESISpectrum"),)
RUNS = {"images": ((), ()), "images+scalars": (SCALARS, ()), "images+scalars+spectrum": (SCALARS, SPECTRA)}


def bytes_read(source: Path, columns: list[str]) -> int:
    """Compressed bytes of the parquet column chunks under `columns` (a struct column: all its leaves)."""
    import pyarrow.parquet as pq

    total = 0
    for f in sorted(source.glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                chunk = meta.row_group(g).column(c)
                if any(chunk.path_in_schema == col or chunk.path_in_schema.startswith(col + ".") for col in columns):
                    total += chunk.total_compressed_size
    return total


def time_loaders(args) -> dict:
    """Galaxies/s and tokens/s of the trainer's loader: images alone against images beside catalogue columns."""
    import numpy as np

    from astropt_tok.store import TokenStore, write_store_from_arrays
    from astropt_train.data import EpochBatchSampler, TokenRows, make_loader

    rng = np.random.default_rng(0)
    n, batch = args.loader_rows, 32
    image = rng.integers(0, 4375, (n, 576))
    columns = {"legacysurvey_image": image, "redshift": rng.integers(0, 1024, (n, 1)),
               **{f"FLUX_{b}": rng.integers(0, 1024, (n, 1)) for b in "GRIZ"},
               "desi_spectrum": rng.integers(0, 1024, (n, 273))}
    specs = {"redshift": {"kind": "scalar", "vocab_size": 1024, "aion_modality": "Z"},
             **{f"FLUX_{b}": {"kind": "scalar", "vocab_size": 1024, "aion_modality": f"LegacySurveyFlux{b}"}
                for b in "GRIZ"},
             "desi_spectrum": {"kind": "spectrum", "vocab_size": 1024, "aion_modality": "DESISpectrum"}}
    codec = {"id": "random", "vocab_size": 4375, "tokens_per_image": 576}
    out: dict = {"rows": n, "batch_size": batch, "workers": 0, "reads": "pread"}
    with tempfile.TemporaryDirectory() as tmp:
        write_store_from_arrays(Path(tmp) / "images", image, 8, codec, ["DES-G", "DES-R", "DES-I", "DES-Z"])
        write_store_from_arrays(Path(tmp) / "mixed", columns, 8, codec,
                                {"legacysurvey_image": ["DES-G", "DES-R", "DES-I", "DES-Z"]}, specs=specs)
        stores = {"images": (TokenStore(Path(tmp) / "images"), None),
                  "images+catalogue+spectrum": (TokenStore(Path(tmp) / "mixed"), list(columns))}
        seconds: dict[str, list[float]] = {name: [] for name in stores}
        for repeat in range(args.repeats):
            for name, (store, modalities) in stores.items():
                sampler = EpochBatchSampler(np.arange(store.num_rows), batch, seed=repeat)
                dataset = TokenRows(store, modalities=modalities) if modalities else None
                loader = iter(make_loader(store, sampler, 0, pin_memory=False, dataset=dataset))
                for _ in range(10):  # warm-up, untimed
                    next(loader)
                t0 = time.perf_counter()
                for _ in range(args.loader_batches):
                    next(loader)
                seconds[name].append(time.perf_counter() - t0)
        for name, (store, modalities) in stores.items():
            tokens = sum(store.modality_tokens[m] for m in modalities) if modalities else store.tokens_per_image
            median = statistics.median(seconds[name])
            out[name] = {"tokens_per_galaxy": tokens,
                         "galaxies_per_s": round(args.loader_batches * batch / median),
                         "tokens_per_s": round(args.loader_batches * batch * tokens / median)}
        out["galaxies_per_s_ratio"] = round(out["images+catalogue+spectrum"]["galaxies_per_s"]
                                            / out["images"]["galaxies_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--loader", action="store_true", help="also time the trainer's loader on mixed lengths")
    parser.add_argument("--loader-only", action="store_true", help="only the loader timing")
    parser.add_argument("--loader-rows", type=int, default=100_000)
    parser.add_argument("--loader-batches", type=int, default=500)
    args = parser.parse_args()
    if args.loader_only:
        print(json.dumps({"loader": time_loaders(args)}, indent=2))
        return

    from astropt_tok.codec import demo_codec_dir
    from astropt_tok.synthetic import write_synthetic_survey
    from astropt_tok.tokenise import TokeniseConfig, tokenise

    work = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    try:
        source = work / "survey"
        write_synthetic_survey(source, n_rows=args.rows, n_files=2, row_group_size=64, with_spectrum=True,
                               with_hsc=False)
        seconds: dict[str, list[float]] = {name: [] for name in RUNS}
        # one run first, not counted: imports, the codecs' first load and the page cache
        tokenise(TokeniseConfig(source=str(source), out=str(work / "warm-up"), shards=4, codec=str(demo_codec_dir()),
                                device="cpu", progress=False, batch_size=args.batch_size, workers=args.workers,
                                scalars=SCALARS, spectra=SPECTRA))
        for repeat in range(args.repeats):
            for name, (scalars, spectra) in RUNS.items():
                out = work / f"tokens-{name}-{repeat}"
                cfg = TokeniseConfig(source=str(source), out=str(out), shards=4, codec=str(demo_codec_dir()),
                                     device="cpu", progress=False, batch_size=args.batch_size, workers=args.workers,
                                     scalars=scalars, spectra=spectra)
                t0 = time.perf_counter()
                summary = tokenise(cfg)
                seconds[name].append(time.perf_counter() - t0)
                assert summary.complete and summary.rows == args.rows, (name, summary.rows, summary.rejected)
                shutil.rmtree(out)
        base = statistics.median(seconds["images"])
        report = {"rows": args.rows, "repeats": args.repeats, "workers": args.workers, "runs": {}}
        for name, (scalars, spectra) in RUNS.items():
            median = statistics.median(seconds[name])
            columns = ["legacysurvey_image.band", "legacysurvey_image.flux", "object_id"] + \
                [c for c, _ in scalars] + [c for c, _ in spectra]
            report["runs"][name] = {"median_s": round(median, 3), "rows_per_s": round(args.rows / median, 1),
                                    "ratio_to_images": round(median / base, 3),
                                    "source_bytes_read": bytes_read(source, columns), "runs_s": [round(s, 3) for s in seconds[name]]}
        if args.loader:
            report["loader"] = time_loaders(args)
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
