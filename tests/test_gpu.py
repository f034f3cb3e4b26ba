"""Paths that exist only on a GPU: pinned staging and non-blocking copies, the precision modes, out-of-memory
messages, more torchrun processes than GPUs, decode in true fp32, and deterministic training.

Every test here is marked `gpu` and skipped without CUDA (`make test-gpu` runs the whole suite on a GPU
machine). References are computed on the same GPU at the same precision.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from astropt_tok import store as st
from astropt_tok.tokenise import TokeniseConfig, tokenise

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
BANDS = ["DES-G", "DES-R", "DES-I", "DES-Z"]


def _survey_flux(survey_dir) -> np.ndarray:
    """Every row's flux [n, 4, 96, 96] (AION's centre crop), read by this project's reader in one process."""
    from astropt_tok.source import batch_to_flux, iter_row_range, resolve_source

    plan = resolve_source(str(survey_dir))
    return np.concatenate([batch_to_flux(b, plan.column, BANDS, crop=96)[0]
                           for _, b in iter_row_range(plan, 0, plan.num_rows)])


def _error_lines(text: str) -> list[str]:
    """The `error: ...` lines of a command's stderr (torchrun may prefix its children's lines with a rank)."""
    return [line[line.index("error: "):] for line in text.splitlines() if "error: " in line]


def test_staging_pins_host_memory_on_a_gpu_run(survey_dir):
    from astropt_tok.source import resolve_source
    from astropt_tok.stages import prepare_shards

    plan = resolve_source(str(survey_dir))
    shards = prepare_shards(plan, [(0, 0, 20), (1, 20, 40)], TokeniseConfig(batch_size=8, workers=1), pin=True)
    try:
        batches = [b for _, shard in shards for b in shard]
    finally:
        shards.close()
    assert sum(len(b.rows) for b in batches) == 40 and all(b.flux.is_pinned() for b in batches)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_gpu_pipeline_gives_the_tokens_of_the_codec_on_the_same_gpu(precision, survey_dir, codec_dir, tmp_path):
    """Reader processes, pinned staging, non-blocking copies and one batch in flight give, at every precision,
    the tokens of the Encoder fed plain pageable host tensors one batch at a time on the same GPU; the manifest
    records the precision; the TF32 flags are back as they were after tokenise()."""
    from astropt_tok.codec import load_image_codec
    from astropt_tok.encoder import NONFINITE_LATENTS, Encoder

    out = tmp_path / precision
    flags_before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    summary = tokenise(TokeniseConfig(source=str(survey_dir), codec=str(codec_dir), out=str(out), shards=4,
                                      batch_size=10, device="cuda", workers=2, precision=precision, progress=False))
    assert summary.complete and summary.rows + summary.rejected == 40
    # TF32 was the precision's inside the codec calls only: the process's flags are as they were
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags_before
    assert st.read_manifest(out)["precision"] == precision and st.verify_store(out) == []

    encoder = Encoder(load_image_codec(str(codec_dir), device="cuda"), "cuda", precision, BANDS)
    flux = _survey_flux(survey_dir)
    parts = [encoder.encode(torch.from_numpy(flux[i:i + 10].copy())) for i in range(0, 40, 10)]  # a batch per shard
    tokens, finite, in_vocab = (np.concatenate(p) for p in zip(*parts))
    kept = finite & in_vocab
    store = st.TokenStore(out)
    everything = np.arange(store.num_rows)
    np.testing.assert_array_equal(store.source_rows(everything), np.nonzero(kept)[0])
    np.testing.assert_array_equal(store.take(everything).astype(np.int64), tokens[kept])
    if not finite.all():  # fp16 may overflow on extreme pixels: those rows say so
        reasons = [json.loads(line)["reason"] for line in (out / st.REJECTS).read_text().splitlines()]
        assert NONFINITE_LATENTS in reasons


def test_fp32_on_the_gpu_is_aions_own_encode_there(survey_dir, codec_dir):
    """The Encoder's two-step encode (latents, then the quantizer) is AION's `codec.encode`, on the GPU too."""
    from aion.modalities import LegacySurveyImage

    from astropt_tok.codec import load_image_codec
    from astropt_tok.encoder import Encoder
    from astropt_tok.executor import tf32_allowed

    loaded = load_image_codec(str(codec_dir), device="cuda")
    flux = torch.from_numpy(_survey_flux(survey_dir)[:16].copy())
    tokens, finite, _ = Encoder(loaded, "cuda", "fp32", BANDS).encode(flux)
    with torch.inference_mode(), tf32_allowed(False):
        plain = loaded.codec.encode(LegacySurveyImage(flux=flux.cuda(), bands=BANDS)).cpu().numpy()
    assert finite.all()
    np.testing.assert_array_equal(tokens, plain)


def _run_with_gpu_memory_cap(cap_bytes: int, *argv: str) -> subprocess.CompletedProcess:
    """`astropt ARGV` in a process whose CUDA caching allocator may hold at most `cap_bytes`."""
    code = ("import sys, torch\n"
            f"torch.cuda.set_per_process_memory_fraction({cap_bytes} / torch.cuda.get_device_properties(0).total_memory)\n"
            "from astropt_tok.cli import main\n"
            "main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_out_of_gpu_memory_while_tokenising_is_one_clear_error(survey_dir, codec_dir, tmp_path):
    out = tmp_path / "tok"
    done = _run_with_gpu_memory_cap(4 << 20, "tokenise", "--source", str(survey_dir), "--codec", str(codec_dir),
                                    "--out", str(out), "--shards", "1", "--batch-size", "40", "--workers", "0",
                                    "--device", "cuda", "--no-progress")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = _error_lines(done.stderr)
    assert "ran out of memory encoding a batch of 40 images" in line and "smaller --batch-size" in line
    assert not st.read_manifest(out)["complete"] and not list(out.glob("shard-*"))


def test_out_of_gpu_memory_while_training_is_one_clear_error(tmp_path):
    store = tmp_path / "store"
    st.write_store_from_arrays(store, np.random.default_rng(0).integers(0, 256, size=(600, 48)), num_shards=1,
                               codec={"id": "random", "vocab_size": 256, "tokens_per_image": 48}, bands=["DES-G"])
    done = _run_with_gpu_memory_cap(2 << 20, "train", "--tokens", str(store), "--out", str(tmp_path / "run"),
                                    "--n-layer", "1", "--n-head", "2", "--n-embd", "64", "--batch-size", "512",
                                    "--max-iters", "2", "--val-images", "0", "--device", "cuda", "--no-compile",
                                    "--dtype", "fp32", "--workers", "0")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = _error_lines(done.stderr)
    assert "ran out of memory at --batch-size 512" in line and "--grad-accum" in line


@pytest.mark.parametrize("command", ["tokenise", "train"])
def test_more_torchrun_processes_than_gpus_is_one_clear_error(command, survey_dir, codec_dir, random_store,
                                                              tmp_path):
    gpus = torch.cuda.device_count()
    out = tmp_path / "out"
    args = (["--source", str(survey_dir), "--codec", str(codec_dir), "--out", str(out), "--shards", "2",
             "--no-progress"] if command == "tokenise" else
            ["--tokens", str(random_store), "--out", str(out), "--preset", "tiny", "--max-iters", "1",
             "--val-images", "0"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus + 1),
           "-m", "astropt_tok", command, *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = _error_lines(done.stderr)
    want = f"error: torchrun started {gpus + 1} processes per node but this node has {gpus} GPU"
    assert lines and all(line.startswith(want) for line in lines), done.stderr[-3000:]
    assert not out.exists()  # nothing was done before the check


def test_decode_on_the_gpu_is_aions_fp32_decode_and_leaves_tf32_as_it_was(random_store, codec_dir, tmp_path):
    from astropt_tok.codec import load_image_codec
    from astropt_tok.executor import tf32_allowed
    from astropt_train.use.decode import DecodeConfig, decode

    torch.backends.cudnn.allow_tf32 = True  # torch's default: cuDNN convolutions in TF32
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    res = decode(DecodeConfig(tokens=random_store, rows="0:6", codec=str(codec_dir), out=tmp_path / "g.png",
                              save_flux=tmp_path / "flux.npy", device="cuda"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    saved = np.load(tmp_path / "flux.npy")
    tokens = torch.as_tensor(st.TokenStore(random_store).take(res.rows).astype(np.int64))
    loaded = load_image_codec(str(codec_dir), device="cuda")
    with torch.inference_mode(), tf32_allowed(False):
        on_gpu = loaded.codec.decode(tokens.cuda(), bands=BANDS).flux.cpu().numpy()
    np.testing.assert_allclose(saved, on_gpu, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # and AION's fp32 decode on the CPU agrees to float32 rounding
        on_cpu = load_image_codec(str(codec_dir)).codec.decode(tokens, bands=BANDS).flux.numpy()
    np.testing.assert_allclose(saved, on_cpu, rtol=1e-4, atol=1e-5)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_deterministic_straight_and_resumed_runs_are_bit_identical_on_the_gpu(compile, tmp_path):
    """bf16 autocast (and torch.compile): with --deterministic a run stopped at step 6 and resumed gives the
    losses and weights of a straight run exactly. Each run is its own process, as a real resume is."""
    from astropt_train import checkpoint as ck

    store = tmp_path / "store"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(4, 48))
    st.write_store_from_arrays(store, base[rng.integers(0, 4, size=96)], num_shards=2,
                               codec={"id": "random", "vocab_size": 256, "tokens_per_image": 48}, bands=["DES-G"])

    def run(out: Path, iters: int, *extra: str) -> None:
        cmd = [sys.executable, "-m", "astropt_tok", "train", "--tokens", str(store), "--out", str(out),
               "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--batch-size", "8", "--max-iters", str(iters),
               "--lr-decay-iters", "12", "--warmup-iters", "2", "--lr", "0.01", "--eval-interval", "6",
               "--eval-iters", "1", "--log-interval", "1", "--val-images", "0", "--checkpoint-interval", "6",
               "--device", "cuda", "--dtype", "bf16", "--compile" if compile else "--no-compile",
               "--deterministic", *extra]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    run(tmp_path / "a", 12)
    run(tmp_path / "b", 6)
    run(tmp_path / "b", 12, "--resume")
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(lb) == list(range(1, 13)) and la == lb
    ma, _ = ck.load_model(tmp_path / "a")
    mb, _ = ck.load_model(tmp_path / "b")
    for (name, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), name


# ---------------------------------------------------------------------------------------------------------
# several modalities (two image columns of each galaxy) on the GPU

TWO_COLUMNS = (("legacysurvey_image", tuple(BANDS)), ("hsc_image", ("HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-Y")))


def check_two_columns_on(device: str, survey_dir, codec_dir, tmp_path) -> None:
    """Two image columns tokenised in one pass on `device` in fp32: each column's tokens are exactly those of a
    one-column run on the same device, and agree with the CPU's two-column store: the same rows kept, and at
    least 99% of tokens identical (another device's fp32 convolutions sum in another order, which can move a
    latent across a quantisation boundary; on the CPU itself all are identical)."""

    def run(out, dev, **kw) -> st.TokenStore:
        summary = tokenise(TokeniseConfig(source=str(survey_dir), codec=str(codec_dir), out=str(out), shards=2,
                                          batch_size=10, device=dev, workers=2, precision="fp32", progress=False,
                                          **kw))
        assert summary.complete and st.verify_store(out) == []
        return st.TokenStore(out)

    both = run(tmp_path / f"both-{device}", device, modalities=TWO_COLUMNS)
    cpu = run(tmp_path / "both-cpu-reference", "cpu", modalities=TWO_COLUMNS)
    assert both.modalities == [name for name, _ in TWO_COLUMNS] and both.num_rows > 0
    rows = np.arange(both.num_rows)
    np.testing.assert_array_equal(both.source_rows(rows), cpu.source_rows(np.arange(cpu.num_rows)))
    for column, bands in TWO_COLUMNS:
        alone = run(tmp_path / f"{column}-{device}", device, column=column, bands=bands)
        position = {int(r): i for i, r in enumerate(alone.source_rows(np.arange(alone.num_rows)))}
        same_rows = np.array([position[int(r)] for r in both.source_rows(rows)])  # every row both kept, alone kept
        np.testing.assert_array_equal(both.take(rows, column), alone.take(same_rows))
        identical = (both.take(rows, column) == cpu.take(rows, column)).mean()
        assert identical >= (1.0 if device == "cpu" else 0.99), (column, identical)


def test_multimodal_gpu_two_columns_tokenise_as_one_column_runs_and_the_cpu(survey_dir, codec_dir, tmp_path):
    check_two_columns_on("cuda", survey_dir, codec_dir, tmp_path)


def test_multimodal_gpu_chunked_loss_equals_plain_loss_on_the_gpu():
    """--loss-chunks with two modalities, a shuffled order and a loss mask on the GPU: fp32 (no TF32) loss and
    gradients equal the plain path's there; under bf16 autocast the two losses agree to bf16 rounding."""
    from astropt_tok.executor import tf32_allowed
    from astropt_train.data import valid_at
    from astropt_train.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=301, block_size=2 * 48, n_layer=2, n_head=2, n_embd=64,
                          modalities=["a", "b"])).cuda()
    tokens = torch.randint(0, 301, (8, 96), device="cuda")
    order = torch.tensor([[1, 0], [0, 1]] * 4, device="cuda")
    valid = torch.ones(8, 2, dtype=torch.bool)
    valid[1, 1] = valid[2, 0] = False
    kw = dict(order=order, loss_mask=valid_at(valid, order.cpu(), 1, 95).cuda(),
              present=valid_at(valid, order.cpu(), 0, 95).cuda())

    def run(chunks: int, dtype):
        model.zero_grad(set_to_none=True)
        parts = {}
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            _, loss = model(tokens[:, :-1], tokens[:, 1:], loss_chunks=chunks, modality_losses=parts, **kw)
        loss.backward()
        return loss.detach(), parts, {k: p.grad.clone() for k, p in model.named_parameters()}

    with tf32_allowed(False):
        plain, plain_parts, plain_grads = run(1, None)
        chunked, parts, grads = run(4, None)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for m in ("a", "b"):
        torch.testing.assert_close(parts[m], plain_parts[m], rtol=1e-5, atol=1e-5)
    for k, g in plain_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6, msg=k)
    bf16_plain, _, _ = run(1, torch.bfloat16)
    bf16_chunked, _, _ = run(4, torch.bfloat16)
    assert torch.isfinite(bf16_chunked) and abs(bf16_chunked - bf16_plain) <= 1e-2 * bf16_plain
    assert abs(bf16_plain - plain) <= 2e-2 * plain


def two_modality_training_runs(device: str, tmp_path: Path, runs: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Train a tiny model on a learnable two-column store once per entry of `runs` (name -> extra flags), each
    in its own process with --shuffle-modalities; returns each run's metrics.jsonl records."""
    store = tmp_path / "store"
    rng = np.random.default_rng(0)
    pick = rng.integers(0, 4, size=96)
    columns = {name: rng.integers(0, 256, size=(4, 48))[pick] for name, _ in TWO_COLUMNS}  # 4 galaxies, repeated
    st.write_store_from_arrays(store, columns, num_shards=2, codec={"id": "random", "vocab_size": 256,
                               "tokens_per_image": 48}, bands={name: list(b) for name, b in TWO_COLUMNS})
    records = {}
    for name, extra in runs.items():
        cmd = [sys.executable, "-m", "astropt_tok", "train", "--tokens", str(store), "--out", str(tmp_path / name),
               "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--batch-size", "8", "--max-iters", "20",
               "--warmup-iters", "2", "--lr", "0.01", "--eval-interval", "20", "--eval-iters", "1",
               "--log-interval", "1", "--val-images", "0", "--device", device,
               "--shuffle-modalities", *extra]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        records[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return records


def check_follows_reference(records: dict[str, list[dict]], reference: str) -> None:
    """Every run's losses (and each modality's) are finite, the first step's loss is the reference's to 2% (the
    same weights and batch), every run learns (last loss under half the first), and ends within 0.5 nats of
    the reference's last loss (fp32 on a CPU: 5.56 down to 1.16 in 20 steps)."""
    ref = [r["loss"] for r in records[reference]]
    for name, recs in records.items():
        losses = [r["loss"] for r in recs]
        assert len(losses) == 20 and all(np.isfinite(losses)), (name, losses)
        assert all(np.isfinite(r[f"loss_{m}"]) for r in recs for m, _ in TWO_COLUMNS), name
        assert abs(losses[0] - ref[0]) <= 0.02 * ref[0], (name, losses[0], ref[0])
        assert losses[-1] < 0.5 * losses[0] and abs(losses[-1] - ref[-1]) <= 0.5, (name, losses, ref)


def test_multimodal_gpu_training_in_bf16_follows_fp32(tmp_path):
    """Two modalities with --shuffle-modalities on CUDA: bf16 autocast, eager and compiled, with --loss-chunks
    trains as fp32 without them does (check_follows_reference), each modality's loss logged."""
    records = two_modality_training_runs("cuda", tmp_path, {
        "fp32": ["--dtype", "fp32", "--no-compile"],
        "bf16-chunks": ["--dtype", "bf16", "--no-compile", "--loss-chunks", "4"],
        "bf16-compiled-chunks": ["--dtype", "bf16", "--compile", "--loss-chunks", "4"],
    })
    check_follows_reference(records, "fp32")
