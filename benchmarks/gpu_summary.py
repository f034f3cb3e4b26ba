"""Read what `benchmarks/gpu.sh` wrote into OUT (pytest.xml and the benchmarks' JSON), write OUT/summary.json,
and print one PASS/FAIL line per goal of issue 8 (a goal whose stage did not run says NOT RUN).

    python benchmarks/gpu_summary.py bench-out --seconds 455
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

NEEDS_GPU = "needs a CUDA GPU"  # the reason conftest.py gives when it skips a gpu test


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def first(results, benchmark: str) -> dict | None:
    """The first result of `benchmark` in a bench_tokenise --json list."""
    return next((r for r in results or [] if r.get("benchmark") == benchmark), None)


def read_tests(path: Path) -> dict[str, str] | None:
    """test id -> passed | failed | skipped (with the reason) from a pytest junit XML."""
    if not path.is_file():
        return None
    outcome = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = f"skipped: {child.get('message', '')}"
        outcome[name] = status
    return outcome


def tests_goal(tests: dict[str, str] | None, *needles: str) -> tuple[str, str]:
    """PASS when every test whose id holds one of `needles` passed and none of them was skipped for want of a
    GPU (and there is at least one)."""
    if tests is None:
        return "NOT RUN", "no pytest.xml"
    chosen = {k: v for k, v in tests.items() if any(n in k for n in needles)}
    bad = {k: v for k, v in chosen.items() if v != "passed" and not (v.startswith("skipped") and NEEDS_GPU not in v)}
    ok = chosen and not bad
    detail = f"{sum(v == 'passed' for v in chosen.values())} of {len(chosen)} tests passed"
    if bad:
        detail += "; not passed: " + ", ".join(f"{k.rsplit('::', 1)[-1]} ({v[:40]})" for k, v in list(bad.items())[:4])
    return ("PASS" if ok else "FAIL"), detail


MM_RUNS = ("1", "2", "2_shuffled")  # gpu.sh's multimodal training runs: mm_train_<run>.json


def multimodal_goal(out: Path, tests: dict[str, str] | None) -> tuple[str, str]:
    """PASS when the gpu tests of several modalities passed (if the suite ran), tokenising two columns in one
    pass made one codec call per column per batch, and every multimodal training run ended with a finite loss;
    the detail has the ratios (one pass vs two runs, 2 modalities vs 1 at the same tokens per step)."""
    if (out / "multimodal_skipped.txt").is_file():
        return "NOT RUN", (out / "multimodal_skipped.txt").read_text().strip().lstrip("= ")
    tok, runs = load(out / "mm_tokenise.json"), {k: load(out / f"mm_train_{k}.json") for k in MM_RUNS}
    if tok is None or not all(runs.values()):
        return "NOT RUN", "multimodal results missing"
    counts = tok["counts"]
    alone = [counts["legacysurvey_image alone"], counts["hsc_image alone"]]
    calls_ok = all(counts["both in one pass"][k] == sum(a[k] for a in alone) for k in ("codec_calls", "images_encoded"))
    finite = all(r["final_loss"] == r["final_loss"] and abs(r["final_loss"]) != float("inf") for r in runs.values())
    one, two, shuffled = (runs[k]["tokens_per_s"] for k in MM_RUNS)
    detail = (f"two columns in one pass take {tok['both_vs_two_separate_runs']:.2f}x the time of two one-column runs "
              f"({tok['rows']} rows, {tok['precision']}); codec calls {'one per column per batch' if calls_ok else 'WRONG'}; "
              f"training 2 modalities {two / one:.2f}x the tokens/s of 1 ({one:,} tokens/s), shuffled with "
              f"--loss-chunks {runs['2_shuffled']['loss_chunks']} {shuffled / two:.2f}x fixed order")
    ok = calls_ok and finite
    if tests is not None:
        status, text = tests_goal(tests, "multimodal_gpu")
        ok, detail = ok and status == "PASS", f"{detail}; gpu tests: {text}"
    return ("PASS" if ok else "FAIL"), detail


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float, required=True, help="gpu.sh's wall time so far")
    ap.add_argument("--stages", default="tests tokenise train memory multimodal")
    args = ap.parse_args(argv)
    out = args.out

    tests = read_tests(out / "pytest.xml")
    fp32, bf16 = first(load(out / "encode_fp32.json"), "encode"), first(load(out / "encode_bf16.json"), "encode")
    startup = first(load(out / "startup.json"), "startup")
    trains = [load(p) for p in sorted(out.glob("train_b*.json"))]
    plain = [t for t in trains if t and not t.get("deterministic")]
    strict = [t for t in trains if t and t.get("deterministic")]
    memory = load(out / "memory.json")
    goals: list[tuple[str, str, str]] = []  # (goal, PASS/FAIL/NOT RUN, detail)

    goals.append(("1 token integrity: NaN/inf latents rejected on the GPU", *tests_goal(tests, "latents", "overflow")))
    if tests is None:
        goals.append(("2 the whole suite passes on CUDA", "NOT RUN", "no pytest.xml"))
    else:
        failed = [k for k, v in tests.items() if v == "failed"]
        skipped_gpu = [k for k, v in tests.items() if v.startswith("skipped") and NEEDS_GPU in v]
        ok = not failed and not skipped_gpu
        goals.append(("2 the whole suite passes on CUDA", "PASS" if ok else "FAIL",
                      f"{sum(v == 'passed' for v in tests.values())} passed, {len(failed)} failed, "
                      f"{len(skipped_gpu)} gpu tests skipped" + (f"; failed: {', '.join(f.rsplit('::', 1)[-1] for f in failed[:5])}" if failed else "")))
    goals.append(("3 more torchrun processes than GPUs: one clear error", *tests_goal(tests, "torchrun_processes_than")))
    status, detail = tests_goal(tests, "deterministic", "decode_on_the_gpu")
    if plain and strict:
        same = [t for t in plain if t["batch_size"] == strict[0]["batch_size"] and t.get("loss_chunks", 1) == 1]
        if same:
            detail += f"; --deterministic costs {1 - strict[0]['tokens_per_s'] / same[0]['tokens_per_s']:.1%} tokens/s"
    goals.append(("4 determinism: --deterministic resume bit-identical, fp32 decode", status, detail))

    if fp32 and bf16 and startup:
        checks = {
            "fp32 after first batch >= 0.95": fp32["pipeline_after_first_batch_vs_codec_alone"] >= 0.95,
            "bf16 after first batch >= 0.95": bf16["pipeline_after_first_batch_vs_codec_alone"] >= 0.95,
            f"bf16 all shard time at {bf16['rows']} rows >= 0.85": bf16["pipeline_vs_codec_alone"] >= 0.85,
            "start-up <= 5 s": startup["command_start_to_first_batch_encoded_s"] <= 5.0,
        }
        detail = (f"fp32 {fp32['pipeline_after_first_batch_vs_codec_alone']:.2f}x, bf16 "
                  f"{bf16['pipeline_after_first_batch_vs_codec_alone']:.2f}x after the first batch and "
                  f"{bf16['pipeline_vs_codec_alone']:.2f}x over all shard time ({bf16['rows']} rows); start-up "
                  f"{startup['command_start_to_first_batch_encoded_s']:.1f} s")
        missed = [k for k, v in checks.items() if not v]
        goals.append(("5 tokenise speed", "PASS" if not missed else "FAIL",
                      detail + (f"; missed: {', '.join(missed)}" if missed else "")))
    else:
        goals.append(("5 tokenise speed", "NOT RUN", "encode/startup results missing"))

    mfus = [t["mfu"] for t in plain if t.get("mfu") is not None]
    if mfus:
        best = max(plain, key=lambda t: t.get("mfu") or 0)
        def name(t: dict) -> str:
            chunks = t.get("loss_chunks", 1)
            return f"batch {t['batch_size']}" + (f" --loss-chunks {chunks}" if chunks > 1 else "")

        detail = (f"best MFU {best['mfu']:.1%} at {name(best)} ({best['tokens_per_s']:,} tokens/s); "
                  + ", ".join(f"{name(t)}: {t['mfu']:.1%}" for t in plain if t.get("mfu") is not None))
        goals.append(("6 training MFU >= 45% (95M, bf16, compiled)", "PASS" if best["mfu"] >= 0.45 else "FAIL", detail))
    else:
        goals.append(("6 training MFU >= 45% (95M, bf16, compiled)", "NOT RUN", "no GPU training result"))
    goals.append(("7 gpu.sh in <= 8 minutes", "PASS" if args.seconds <= 480 else "FAIL",
                  f"{args.seconds:.0f} s (stages: {args.stages})"))

    goals.append(("8 multimodal on the GPU", *multimodal_goal(out, tests)))
    memory_ac = load(out / "memory_ac.json")
    goals.append(("9 activation checkpointing and the memory plan", *checkpointing_goal(memory, memory_ac)))

    summary = {"goals": [{"goal": g, "result": r, "detail": d} for g, r, d in goals],
               "seconds": args.seconds, "encode_fp32": fp32, "encode_bf16": bf16, "startup": startup,
               "train": trains, "largest_batch": memory,
               "multimodal": {"tokenise": load(out / "mm_tokenise.json"),
                              "train": {k: load(out / f"mm_train_{k}.json") for k in MM_RUNS}},
               "tests": None if tests is None else {"passed": sum(v == "passed" for v in tests.values()),
                                                    "failed": [k for k, v in tests.items() if v == "failed"],
                                                    "skipped": {k: v for k, v in tests.items() if v.startswith("skipped")}}}
    summary["largest_batch_activation_checkpointing"] = memory_ac
    from astropt_tok.atomic import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")  # whole or not at all
    if memory:
        for m in memory:
            print(f"largest batch {m['preset']}: {m.get('largest_batch')} (peak {m.get('peak_gb_at_largest')} GB "
                  f"of {m.get('gpu_memory_gb')} GB, eager bf16 step)")
    for goal, result, detail in goals:
        print(f"{result:7s} {goal}: {detail}")
    return summary


def checkpointing_goal(plain: list | None, checkpointed: list | None) -> tuple[str, str]:
    """Goal 9: per preset, --activation-checkpointing fits a larger batch than without, and the measured peak at
    the largest batch is at most `astropt plan`'s per-rank total (overhead left out) in both modes."""
    if not plain or not checkpointed:
        return "NOT RUN", "no memory.json / memory_ac.json (the memory stage)"
    if any(m.get("peak_gb_at_largest") is None for m in plain + checkpointed):
        return "NOT RUN", "no GPU memory figures (a CPU run, or no batch fitted)"
    by_preset = {m["preset"]: m for m in plain}
    bad, parts = [], []
    for m in checkpointed:
        p = by_preset.get(m["preset"]) or {}
        ratios = [x.get("measured_over_planned") for x in (p, m)]
        if not (m.get("largest_batch") or 0) > (p.get("largest_batch") or 0):
            bad.append(f"{m['preset']}: AC batch {m.get('largest_batch')} <= {p.get('largest_batch')}")
        if any(r is None or r > 1 for r in ratios):
            bad.append(f"{m['preset']}: measured/planned {ratios}")
        parts.append(f"{m['preset']} batch {p.get('largest_batch')} -> {m.get('largest_batch')} with AC, "
                     f"measured/planned {ratios}")
    return ("FAIL" if bad else "PASS"), "; ".join(bad or parts)


if __name__ == "__main__":
    main()
