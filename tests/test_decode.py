"""`astropt decode` on stored rows: flux equals AION's own decode, the PNG grid, --save-flux, metrics, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from astropt_tok.errors import AstroptError
from astropt_train.use.decode import (
    DecodeConfig,
    check_token_range,
    decode,
    decode_tokens,
    parse_rows,
    reconstruction_metrics,
)
from astropt_train.use.images import GridLayout, rgb_composite, save_grid


@pytest.fixture(scope="module")
def codec(codec_dir):
    from astropt_tok.codec import load_image_codec

    return load_image_codec(str(codec_dir))


def test_decoded_flux_equals_aion_decode_of_stored_tokens(random_store, codec_dir, codec, tmp_path):
    from astropt_tok.store import TokenStore

    store = TokenStore(random_store)
    res = decode(DecodeConfig(tokens=random_store, rows="3:7,250", codec=str(codec_dir), out=tmp_path / "g.png",
                              save_flux=tmp_path / "flux.npy", batch_size=2, device="cpu"))  # as the reference
    assert list(res.rows) == [3, 4, 5, 6, 250]
    with torch.inference_mode():
        want = codec.codec.decode(torch.as_tensor(store.take(res.rows).astype(np.int64)), bands=store.bands).flux.numpy()
    saved = np.load(tmp_path / "flux.npy")
    assert saved.dtype == np.float32 and saved.shape == (5, 4, 96, 96)
    np.testing.assert_allclose(saved, want, rtol=1e-5, atol=1e-6)
    assert res.labels == ["obj3", "obj4", "obj5", "obj6", "obj250"]
    assert float(np.abs(saved).max()) > 0  # a real picture, not zeros


def test_flux_bands_follow_bands_option(random_store, codec_dir, codec, tmp_path):
    res = decode(DecodeConfig(tokens=random_store, ids=["obj7", "obj2"], codec=str(codec_dir), out=tmp_path / "g.png",
                              bands=["DES-I"], save_flux=tmp_path / "i.npy", device="cpu"))
    assert list(res.rows) == [7, 2]
    full = decode_tokens(codec, res.tokens, ["DES-G", "DES-R", "DES-I", "DES-Z"])
    np.testing.assert_allclose(np.load(tmp_path / "i.npy"), full[:, 2:3], rtol=1e-5, atol=1e-6)


def test_grid_is_a_png_of_the_expected_size(random_store, codec_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    decode(DecodeConfig(tokens=random_store, random=5, seed=3, codec=str(codec_dir), out=out, ncols=3))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layout = GridLayout(ncols=3)
    w, h = layout.size(5, 96, 96)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size[0] == w and im.size[1] > h + 3 * layout.label_height  # + title, column name, stretch note
        assert w == 3 * (96 * 2 + 2) + 2 and h == 2 * (96 * 2 + 14 + 2) + 2
        px = np.asarray(im)
    top = 2 * layout.label_height + 2  # below the title and the column name
    assert px[top : top + 192, 2 : 2 + 192].std() > 0  # first panel drawn


def test_random_rows_are_seeded(random_store, codec_dir, tmp_path):
    a = decode(DecodeConfig(tokens=random_store, random=4, seed=1, codec=str(codec_dir), out=tmp_path / "a.png"))
    b = decode(DecodeConfig(tokens=random_store, random=4, seed=1, codec=str(codec_dir), out=tmp_path / "b.png"))
    c = decode(DecodeConfig(tokens=random_store, random=4, seed=2, codec=str(codec_dir), out=tmp_path / "c.png"))
    assert list(a.rows) == list(b.rows) and list(a.rows) != list(c.rows)
    assert len(set(a.rows.tolist())) == 4


def test_reconstruction_metrics_known_answer():
    rng = np.random.default_rng(0)
    recon = rng.normal(size=(2, 3, 96, 96))
    checker = np.where((np.add.outer(np.arange(96), np.arange(96)) % 2) == 0, 1.0, -1.0)  # +-1, mean square 1
    offsets = np.array([0.5, 0.1, 2.0])
    crop = recon + offsets[None, :, None, None] * checker  # so MSE per band is offset^2 exactly
    original = np.zeros((2, 3, 160, 160))
    original[:, :, 32:128, 32:128] = crop  # AION's crop of 160 starts at (160 - 96) // 2 = 32
    original[:, :, 0, 0] = 1e6  # outside the crop: must not count
    m = reconstruction_metrics(original, recon, ["DES-G", "DES-R", "DES-Z"])
    np.testing.assert_allclose(m["mse"], np.broadcast_to(offsets**2, (2, 3)), rtol=1e-12)
    rng_ = crop.max(axis=(-2, -1)) - crop.min(axis=(-2, -1))
    np.testing.assert_allclose(m["psnr"], 10 * np.log10(rng_**2 / offsets**2), rtol=1e-12)
    assert m["per_band"]["DES-Z"]["mse"] == pytest.approx(4.0)
    perfect = reconstruction_metrics(original, crop, ["DES-G", "DES-R", "DES-Z"])
    assert np.isinf(perfect["psnr"]).all() and (perfect["mse"] == 0).all()


def test_rgb_composite_maps_bands_and_uses_one_stretch_per_figure():
    flux = np.zeros((2, 3, 8, 8), np.float32)
    flux[0, 2] = 1.0  # DES-Z bright in galaxy 0 -> red
    flux[1, 0] = 0.2  # DES-G faint in galaxy 1 -> a little blue
    rgb = rgb_composite(flux, ["DES-G", "DES-R", "DES-Z"])
    assert rgb.shape == (2, 8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert rgb[0, ..., 0].min() > 0.9 and rgb[0, ..., 2].max() == 0
    assert 0 < rgb[1, ..., 2].max() <= 1 and rgb[1, ..., 0].max() == 0
    with pytest.raises(AstroptError, match="DES-Z"):
        rgb_composite(flux, ["DES-G", "DES-R", "DES-I"])


def test_save_grid_refuses_non_png(tmp_path):
    with pytest.raises(AstroptError, match=".png"):
        save_grid(np.zeros((1, 4, 4, 3)), ["x"], tmp_path / "x.jpg", GridLayout(ncols=1))


def test_parse_rows():
    assert parse_rows("0:3,10", 20).tolist() == [0, 1, 2, 10]
    assert parse_rows("-2:", 20).tolist() == [18, 19]
    assert parse_rows("5", 20).tolist() == [5]
    for bad in ("0:21", "20", "-21", "a:b", "3:3"):
        with pytest.raises(AstroptError):
            parse_rows(bad, 20)


def test_tokens_outside_vocab_are_refused(codec):
    tokens = np.zeros((2, 576), np.int64)
    tokens[1, 17] = 4375
    with pytest.raises(AstroptError, match="4375 at sequence 1, position 17"):
        decode_tokens(codec, tokens, ["DES-G"])
    tokens[1, 17] = -1
    with pytest.raises(AstroptError, match="outside"):
        check_token_range(tokens, 4375)


def _run_cli(argv):
    from astropt_tok.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rows", "0:301"], "out of range"),
        (["--ids", "obj1,nope"], "nope"),
        (["--rows", "1", "--ids", "obj1"], "exactly one"),
        (["--rows", "1", "--compare"], "source"),
        (["--rows", "1", "--save-flux", "x.txt"], ".npy or .fits"),
        (["--rows", "1", "--rgb", "DES-G,DES-R,DES-Q"], "DES-Q"),
        (["--rows", "1", "--bands", "HSC-G"], "--bands HSC-G: the tokens decoded are those of token store"),
        (["--rows", "1", "--rgb", "HSC-I,HSC-R,HSC-G"], "in bands DES-G,DES-R,DES-I,DES-Z"),
        (["--rows", "1", "--modality", "hsc_image"], "--modality hsc_image: token store"),
        (["--rows", "1", "--device", "tpu"], "--device 'tpu'"),
        (["--random", "301"], "300 rows"),
        (["--rows", "1", "--top-k", "0"], "--top-k"),
        (["--rows", "1", "--threads", "0"], "--threads must be at least 1"),
        (["--rows", "1", "--out", "FILE/g.png"], "the output folder"),
    ],
)
def test_cli_bad_input_is_one_clear_error(random_store, codec_dir, tmp_path, capsys, extra, message):
    (tmp_path / "FILE").write_text("a file, where a folder is needed")
    code = _run_cli(["decode", "--tokens", str(random_store), "--codec", str(codec_dir), "--out",
                     str(tmp_path / "g.png"), *[str(tmp_path / e) if e in ("x.txt", "FILE/g.png") else e
                                                for e in extra]])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_a_store_whose_vocab_differs_from_the_codec(codec_dir, tmp_path, capsys):
    from astropt_tok.store import write_store_from_arrays

    store = tmp_path / "big-vocab"
    write_store_from_arrays(store, np.full((3, 576), 5000), num_shards=1,
                            codec={"id": "other", "vocab_size": 8000, "tokens_per_image": 576}, bands=["DES-G"])
    code = _run_cli(["decode", "--tokens", str(store), "--codec", str(codec_dir), "--rows", "0", "--out",
                     str(tmp_path / "g.png")])
    assert code == 1 and "vocabulary of 8000" in capsys.readouterr().err


def test_cli_writes_grid_and_flux(random_store, codec_dir, tmp_path, capsys):
    code = _run_cli(["decode", "--tokens", str(random_store), "--codec", str(codec_dir), "--rows", "0:2",
                     "--out", str(tmp_path / "g.png"), "--save-flux", str(tmp_path / "f.npy"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "stored" and summary["images"] == 2
    assert np.load(tmp_path / "f.npy").shape == (2, 4, 96, 96)


def test_fits_output_when_astropy_is_installed(random_store, codec_dir, tmp_path):
    fits = pytest.importorskip("astropy.io.fits")
    res = decode(DecodeConfig(tokens=random_store, rows="0:2", codec=str(codec_dir), out=tmp_path / "g.png",
                              save_flux=tmp_path / "f.fits"))
    with fits.open(tmp_path / "f.fits") as hdul:
        np.testing.assert_array_equal(hdul[0].data, res.flux)
        assert hdul[0].header["BAND0"] == "DES-G"


def test_fits_without_astropy_is_a_clear_error(random_store, codec_dir, tmp_path):
    try:
        import astropy  # noqa: F401
    except ImportError:
        with pytest.raises(AstroptError, match="astropy"):
            decode(DecodeConfig(tokens=random_store, rows="0", codec=str(codec_dir), out=tmp_path / "g.png",
                                save_flux=tmp_path / "f.fits"))
    else:
        pytest.skip("astropy is installed: FITS is written (see the test above)")


def test_cli_module_imports_only_typer_and_stdlib():
    import subprocess
    import sys

    code = ("import sys, astropt_train.use.cli as m; "
            "heavy = [x for x in ('torch', 'numpy', 'aion', 'datasets', 'pyarrow', 'PIL', 'rich') if x in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_figure_style_one_stretch_named_columns_and_notes(tmp_path):
    """save_figure: the same flux in two columns draws identical panels (one stretch), notes and header add rows."""
    from PIL import Image

    from astropt_train.use.images import GridLayout, save_figure

    rng = np.random.default_rng(0)
    flux = rng.normal(0, 0.02, (2, 3, 96, 96)).astype(np.float32) + np.linspace(0, 1, 96, dtype=np.float32)
    bands = ["DES-G", "DES-R", "DES-Z"]
    path = save_figure([flux, flux], ["original", "codec reconstruction"], ["obj0", "obj1"], bands,
                       tmp_path / "f.png", title="t", notes=["DES-G: EV 0.9"])
    layout = GridLayout(ncols=4)
    w, h = layout.size(4, 96, 96)
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[1] == w and pixels.shape[0] == h + 4 * layout.label_height + layout.pad  # title, header, 2 notes
    top = 2 * layout.label_height + layout.pad  # below the title and the column names
    cell = 96 * layout.scale + layout.pad
    first = pixels[top : top + 192, layout.pad : layout.pad + 192]
    second = pixels[top : top + 192, layout.pad + cell : layout.pad + cell + 192]
    assert first.std() > 0 and np.array_equal(first, second)
