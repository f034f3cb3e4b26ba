"""`astropt fit-codec`: a real AION ImageCodec fitted through its own quantiser, resumed, saved in the hub layout."""

from __future__ import annotations

import json

import pytest

from astropt_tok.errors import AstroptError
from astropt_tok.fit_codec import FitCodecConfig, fit_codec, learning_rate, read_survey_flux, reconstruct_straight_through


def _cfg(survey_dir, out, **kw):
    base = dict(source=str(survey_dir), out=out, hidden=8, projection=4, steps=4, batch_size=2, lr=3e-3,
                min_lr=3e-3, warmup=0, holdout=0.1, seed=0, device="cpu", progress=False, checkpoint_every=2)
    return FitCodecConfig(**{**base, **kw})


def test_fit_resume_equals_straight_fit_and_loads_as_codec(survey_dir, tmp_path):
    """Two steps, then --resume to four, gives the weights of four straight steps (constant lr), in the hub layout."""
    import torch
    from safetensors.torch import load_file

    from astropt_tok.codec import load_image_codec

    straight = fit_codec(_cfg(survey_dir, tmp_path / "straight"))
    fit_codec(_cfg(survey_dir, tmp_path / "resumed", steps=2))
    resumed = fit_codec(_cfg(survey_dir, tmp_path / "resumed", steps=4, resume=True))
    assert resumed.resumed_from == 2 and not resumed.already_finished
    a = load_file(str(tmp_path / "straight/codecs/image/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/codecs/image/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    loaded = load_image_codec(str(tmp_path / "straight"))  # the loader every command uses
    assert loaded.vocab_size == 4375 and loaded.tokens_per_image == 576 and loaded.config["hidden_dims"] == 8
    report = json.loads((tmp_path / "straight/fit_report.json").read_text())
    assert report["heldout_rows"] == 4 and report["train_rows"] == 36
    for band in ("DES-G", "DES-R", "DES-I", "DES-Z"):
        m = report["heldout"]["per_band"][band]
        assert set(m) == {"mse", "explained_variance", "psnr"}
        assert report["heldout"]["baselines"]["image_mean"][band]["explained_variance"] == pytest.approx(0.0, abs=1e-12)
    assert straight.report == report["heldout"]

    again = fit_codec(_cfg(survey_dir, tmp_path / "resumed", steps=4, resume=True))
    assert again.already_finished

    # --init starts from a fitted codec (its sizes win): one more step moves its weights, but only a little
    tuned = fit_codec(_cfg(survey_dir, tmp_path / "tuned", init=str(tmp_path / "straight"), hidden=64, steps=1, lr=1e-4,
                           min_lr=1e-4))
    c = load_file(str(tmp_path / "tuned/codecs/image/model.safetensors"))
    assert json.loads((tmp_path / "tuned/codecs/image/config.json").read_text())["hidden_dims"] == 8
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(torch.allclose(a[k].float(), c[k].float(), atol=1e-3) for k in a) and tuned.steps == 1


def test_straight_through_path_is_the_codecs_own_round_trip(survey_dir, tmp_path):
    """The differentiable path used for fitting decodes to exactly what encode -> tokens -> decode gives."""
    import torch
    from aion.codecs.image import ImageCodec
    from aion.modalities import Image

    bands = ["DES-G", "DES-R", "DES-I", "DES-Z"]
    flux = torch.as_tensor(read_survey_flux(_cfg(survey_dir, tmp_path, limit=3)))
    torch.manual_seed(0)
    codec = ImageCodec(quantizer_levels=[7, 5, 5, 5, 5], hidden_dims=8, multisurvey_projection_dims=4,
                       num_consecutive=1).eval()
    with torch.no_grad():
        _, ours = reconstruct_straight_through(codec, flux, bands)
        theirs = codec.decode(codec.encode(Image(flux=flux.clone(), bands=bands)), bands=bands).flux
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_schedule_and_refusals(survey_dir, tmp_path):
    cfg = _cfg(survey_dir, tmp_path / "c", lr=1e-3, min_lr=None, warmup=10, steps=110)
    assert learning_rate(0, cfg) == pytest.approx(1e-4) and learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(110, cfg) == pytest.approx(5e-5) and learning_rate(60, cfg) < 1e-3
    with pytest.raises(AstroptError, match="--resume"):
        fit_codec(_cfg(survey_dir, tmp_path / "nothing-yet", resume=True))
    with pytest.raises(AstroptError, match="unknown band"):
        fit_codec(_cfg(survey_dir, tmp_path / "c", bands=("DES-Q",)))
    with pytest.raises(AstroptError, match="mix surveys"):
        fit_codec(_cfg(survey_dir, tmp_path / "c", bands=("DES-G", "HSC-G")))
    with pytest.raises(AstroptError, match="--steps"):
        fit_codec(_cfg(survey_dir, tmp_path / "c", steps=0))
    fit_codec(_cfg(survey_dir, tmp_path / "d", steps=1))
    with pytest.raises(AstroptError, match="already holds a fit"):
        fit_codec(_cfg(survey_dir, tmp_path / "d", steps=1))
    with pytest.raises(AstroptError, match="other settings"):
        fit_codec(_cfg(survey_dir, tmp_path / "d", steps=2, hidden=16, resume=True))


def test_fit_codec_command(survey_dir, tmp_path, capsys):
    from astropt_tok.cli import main

    main(["fit-codec", "--source", str(survey_dir), "--out", str(tmp_path / "c"), "--steps", "1", "--batch-size",
          "2", "--hidden", "8", "--projection", "4", "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert "explained var." in out and "all-zero" in out and "image mean" in out and "DES-Z" in out
    assert (tmp_path / "c/codecs/image/model.safetensors").is_file()
    main(["fit-codec", "--source", str(survey_dir), "--out", str(tmp_path / "c"), "--steps", "1", "--batch-size",
          "2", "--hidden", "8", "--projection", "4", "--device", "cpu", "--resume"])
    assert "fit already finished at step 1; raise --steps to continue" in capsys.readouterr().out


def test_fit_codec_prints_a_progress_line_every_tenth_of_the_steps_when_not_on_a_terminal(survey_dir, tmp_path,
                                                                                         capsys):
    """stderr is no terminal here (as in a pipe or log file): no bar, but a plain line with step and loss at every
    tenth of the steps; a resumed fit goes on from its step; --no-progress prints none."""
    fit_codec(_cfg(survey_dir, tmp_path / "c", steps=20, progress=True, checkpoint_every=10))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fit-codec: ")]
    assert [ln.split()[1] for ln in lines] == [f"{s}/20" for s in range(2, 21, 2)], lines
    assert all(" steps (" in ln and ", loss " in ln and " lr " in ln for ln in lines)
    fit_codec(_cfg(survey_dir, tmp_path / "c", steps=30, progress=True, checkpoint_every=10, resume=True))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fit-codec: ")]
    assert [ln.split()[1] for ln in lines] == ["21/30", "24/30", "27/30", "30/30"], lines
    fit_codec(_cfg(survey_dir, tmp_path / "quiet", steps=4))  # progress=False
    assert "fit-codec: " not in capsys.readouterr().err


def test_fit_on_two_surveys_learns_both_and_decodes_hsc(survey_dir, tmp_path):
    """--column NAME:BANDS twice: one codec, a batch of each survey per step, a report per column; the saved
    codec encodes and decodes HSC bands (polymathic-aion 0.0.2 alone cannot decode them)."""
    from astropt_tok.codec import load_image_codec

    des, hsc = ("DES-G", "DES-R", "DES-I", "DES-Z"), ("HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-Y")
    cfg = _cfg(survey_dir, tmp_path / "both", steps=2, modalities=(("legacysurvey_image", des), ("hsc_image", hsc)))
    result = fit_codec(cfg)
    assert set(result.reports) == {"legacysurvey_image", "hsc_image"}
    assert set(result.reports["hsc_image"]["per_band"]) == set(hsc) and result.report == result.reports["legacysurvey_image"]
    saved = json.loads((tmp_path / "both/fit_report.json").read_text())
    assert saved["heldout_by_column"]["hsc_image"]["report"]["per_band"].keys() == set(hsc)
    assert set(saved["heldout_by_column"]["hsc_image"]["report"]["colours"]) == {"g-r", "r-i", "i-z", "z-y"}

    # a one-survey fit of the same settings takes other steps: the HSC batches moved the weights
    from safetensors.torch import load_file

    one = fit_codec(_cfg(survey_dir, tmp_path / "one", steps=2))
    a, b = (load_file(str(tmp_path / d / "codecs/image/model.safetensors")) for d in ("both", "one"))
    assert not all(a[k].equal(b[k]) for k in a) and one.reports.keys() == {"legacysurvey_image"}

    codec = load_image_codec(str(tmp_path / "both"))
    flux = read_survey_flux(cfg, "hsc_image", list(hsc))[:2]
    from astropt_tok.fit_codec import round_trip

    assert round_trip(codec.codec, flux, list(hsc)).shape == (2, 5, 96, 96)

    with pytest.raises(AstroptError, match="more than once"):
        fit_codec(_cfg(survey_dir, tmp_path / "x", modalities=(("hsc_image", hsc), ("hsc_image", hsc))))
    with pytest.raises(AstroptError, match="--column hsc_image .*mix surveys"):
        fit_codec(_cfg(survey_dir, tmp_path / "x", modalities=(("legacysurvey_image", des), ("hsc_image", ("HSC-G", "DES-R")))))


def test_colour_weight_adds_a_colour_term(survey_dir, tmp_path):
    """--colour-weight 0 is the plain fit, bit for bit; a positive weight changes the steps; a negative one is refused."""
    from safetensors.torch import load_file

    fit_codec(_cfg(survey_dir, tmp_path / "plain", steps=2))
    fit_codec(_cfg(survey_dir, tmp_path / "zero", steps=2, colour_weight=0.0))
    fit_codec(_cfg(survey_dir, tmp_path / "colour", steps=2, colour_weight=1.0))
    plain, zero, colour = (load_file(str(tmp_path / d / "codecs/image/model.safetensors")) for d in ("plain", "zero", "colour"))
    assert all(plain[k].equal(zero[k]) for k in plain)
    assert not all(plain[k].equal(colour[k]) for k in plain)
    with pytest.raises(AstroptError, match="--colour-weight"):
        fit_codec(_cfg(survey_dir, tmp_path / "x", colour_weight=-1.0))


def test_colour_scores_known_answer():
    """Dimming one band by 0.5 mag shifts that colour by exactly 0.5 mag; the one-colour baseline is the spread."""
    import numpy as np

    from astropt_tok.quality import colour_scores

    rng = np.random.default_rng(0)
    original = rng.uniform(0.5, 2.0, size=(10, 3, 32, 32))  # positive flux everywhere
    recon = original.copy()
    recon[:, 1] *= 10 ** (-0.4 * 0.5)  # r fainter by 0.5 mag: g-r redder... by -0.5, r-i by +0.5
    scores = colour_scores(original, recon, ["DES-G", "DES-R", "DES-I"])
    assert scores["g-r"]["rms_mag"] == pytest.approx(0.5) and scores["r-i"]["rms_mag"] == pytest.approx(0.5)
    assert scores["g-r"]["galaxies"] == 10
    perfect = colour_scores(original, original, ["DES-G", "DES-R", "DES-I"])
    assert perfect["g-r"]["rms_mag"] == 0.0 and perfect["g-r"]["baseline_rms_mag"] > 0
    same_colour = original[:, :1] * np.array([1.0, 2.0, 3.0])[None, :, None, None]  # one colour for all: baseline 0
    assert colour_scores(same_colour, same_colour, ["DES-G", "DES-R", "DES-I"])["g-r"]["baseline_rms_mag"] == pytest.approx(0.0, abs=1e-9)
    assert colour_scores(-original, original, ["DES-G", "DES-R", "DES-I"])["g-r"] == {"rms_mag": None, "baseline_rms_mag": None,
                                                                                 "galaxies": 0}
