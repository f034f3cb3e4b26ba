"""Several surveys of one galaxy: the synthetic HSC view, multi-column tokenising, multimodal training and
cross-survey decoding."""

from __future__ import annotations

import numpy as np

from astropt_tok.synthetic import HSC_BANDS, synthetic_rows


def _flux(cols, column):
    return np.stack([np.stack(image["flux"]) for image in cols[column]])  # [rows, bands, H, W]


def test_synthetic_hsc_is_the_same_galaxy_deeper_and_sharper():
    with_hsc, without = synthetic_rows(0, 4, seed=3), synthetic_rows(0, 4, seed=3, with_hsc=False)
    assert np.array_equal(_flux(with_hsc, "legacysurvey_image"), _flux(without, "legacysurvey_image"))
    ls, hsc = _flux(with_hsc, "legacysurvey_image"), _flux(with_hsc, "hsc_image")
    assert hsc.shape == (4, 5, 160, 160) and hsc.dtype == np.float32
    assert all(image["band"] == list(HSC_BANDS) for image in with_hsc["hsc_image"])
    assert set(with_hsc["hsc_image"][0]) == set(with_hsc["legacysurvey_image"][0])  # the same struct fields
    corner = (slice(None), slice(None), slice(0, 12), slice(0, 12))  # sky only: HSC is deeper
    assert hsc[corner].std() < 0.5 * ls[corner].std()
    # the same galaxy: its brightest pixel is at the same place on the sky (finer HSC pixels, same centre)
    for g in range(4):
        ly, lx = np.unravel_index(ls[g].sum(0).argmax(), ls.shape[2:])
        hy, hx = np.unravel_index(hsc[g].sum(0).argmax(), hsc.shape[2:])
        scale = 0.262 / 0.168
        assert abs((hy - 79.5) - (ly - 79.5) * scale) < 4 and abs((hx - 79.5) - (lx - 79.5) * scale) < 4
