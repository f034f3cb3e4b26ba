"""Several surveys of one galaxy: what tokenising two image columns in one pass costs against one column at a
time, how many codec calls it makes, and how fast the trainer's loader serves two-modality sequences.

    python benchmarks/bench_surveys.py tokenise --rows 256 --repeats 3              # tiny codec: reading dominates
    python benchmarks/bench_surveys.py tokenise --rows 32 --repeats 2 --codec base  # aion-base architecture
    python benchmarks/bench_surveys.py loader --rows 20000 --repeats 5
    python benchmarks/bench_surveys.py tokenise --rows 512 --repeats 1 --codec base --device cuda --precision bf16 \
        --workers 2 --batch-size 256 --json mm.json                                   # gpu.sh's multimodal stage

Each prints one JSON object. `tokenise` runs, interleaved, the Legacy Survey column alone, the HSC column alone
and both in one pass (`--column legacysurvey_image:... --column hsc_image:...`) on the same synthetic survey, and
counts the codec's encode calls (the real AION ImageCodec, its `_encode` wrapped to count). `loader` times the
trainer's own DataLoader (TokenRows + EpochBatchSampler, one process) on a one-column store and on a two-column
store of the same rows (fixed order, and --shuffle-modalities).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

LS = ("legacysurvey_image", ("DES-G", "DES-R", "DES-I", "DES-Z"))
HSC = ("hsc_image", ("HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-Y"))


def bench_tokenise(args, work: Path) -> dict:
    from aion.codecs.image import ImageCodec

    from astropt_tok.codec import make_random_codec
    from astropt_tok.synthetic import write_synthetic_survey
    from astropt_tok.tokenise import TokeniseConfig, tokenise

    survey = work / "survey"
    write_synthetic_survey(survey, n_rows=args.rows, n_files=2, seed=0, row_group_size=32, processes=2)
    codec = make_random_codec(work / "codec", "tiny" if args.codec == "tiny" else "full")
    calls = []
    real = ImageCodec._encode

    def counted(self, image):
        calls.append(int(image.flux.shape[0]))
        return real(self, image)

    ImageCodec._encode = counted
    runs = {"legacysurvey_image alone": dict(column=LS[0], bands=LS[1]),
            "hsc_image alone": dict(column=HSC[0], bands=HSC[1]),
            "both in one pass": dict(modalities=(LS, HSC))}
    times = {k: [] for k in runs}
    counts = {}
    for r in range(args.repeats):
        for name, kw in runs.items():
            calls.clear()
            t = time.perf_counter()
            tokenise(TokeniseConfig(source=str(survey), out=str(work / f"store-{r}-{len(times[name])}-{hash(name)}"),
                                    shards=1, codec=str(codec), batch_size=args.batch_size, device=args.device,
                                    precision=args.precision, workers=args.workers, progress=False, **kw))
            times[name].append(time.perf_counter() - t)
            counts[name] = {"codec_calls": len(calls), "images_encoded": sum(calls)}
    med = {k: statistics.median(v) for k, v in times.items()}
    separate = med["legacysurvey_image alone"] + med["hsc_image alone"]
    return {"rows": args.rows, "codec": args.codec, "batch_size": args.batch_size, "repeats": args.repeats,
            "device": args.device, "precision": args.precision,
            "seconds_median": med, "rows_per_s": {k: args.rows / v for k, v in med.items()}, "counts": counts,
            "both_vs_two_separate_runs": med["both in one pass"] / separate}


def bench_loader(args, work: Path) -> dict:
    import torch

    from astropt_tok.store import TokenStore, write_store_from_arrays
    from astropt_train.data import EpochBatchSampler, TokenRows, make_loader

    rng = np.random.default_rng(0)
    codec = {"id": "random", "vocab_size": 4375, "tokens_per_image": 576}
    ls, hsc = (rng.integers(0, 4375, size=(args.rows, 576)) for _ in range(2))
    write_store_from_arrays(work / "one", ls, 4, codec, list(LS[1]))
    write_store_from_arrays(work / "two", {LS[0]: ls, HSC[0]: hsc}, 4, codec, {LS[0]: list(LS[1]), HSC[0]: list(HSC[1])})
    cases = {"one column (576 tokens/galaxy)": ("one", None, False),
             "two columns, fixed order (1,152 tokens/galaxy)": ("two", [LS[0], HSC[0]], False),
             "two columns, --shuffle-modalities": ("two", [LS[0], HSC[0]], True)}
    rates = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, (folder, names, shuffle) in cases.items():
            store = TokenStore(work / folder)
            sampler = EpochBatchSampler(np.arange(store.num_rows), args.batch_size, seed=len(rates[name]))
            dataset = TokenRows(store, modalities=names, shuffle=shuffle)
            loader = make_loader(store, sampler, 0, pin_memory=False, dataset=dataset)
            it = iter(loader)
            next(it)
            t = time.perf_counter()
            tokens = 0
            for _ in range(args.batches):
                batch = next(it)
                tokens += (batch["tokens"] if isinstance(batch, dict) else batch).numel()
            rates[name].append(tokens / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"rows": args.rows, "batch_size": args.batch_size, "batches": args.batches, "repeats": args.repeats,
            "tokens_per_s_median": med, "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["tokenise", "loader"])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=500, help="loader: timed batches per repeat")
    ap.add_argument("--codec", choices=["tiny", "base"], default="tiny", help="tokenise: the tiny test codec or "
                    "aion-base's architecture (random weights: speed does not depend on them)")
    ap.add_argument("--device", default="cpu", help="tokenise: where the codec runs")
    ap.add_argument("--precision", default="fp32", help="tokenise: the codec's precision")
    ap.add_argument("--workers", type=int, default=0, help="tokenise: reader processes")
    ap.add_argument("--json", type=Path, help="also write the JSON object to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_tokenise(args, Path(tmp)) if args.what == "tokenise" else bench_loader(args, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.json:
        from astropt_tok.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")  # whole or not at all


if __name__ == "__main__":
    main()
