"""Zone scores: centre/left/right shares, the ETDRS grid (OD vs OS), optic-disc and OCT bands, landmark finder."""
import numpy as np
import pytest

from retina_core.explain.zones import (ETDRS_SUBFIELDS, centre_lr_shares, etdrs_grid_mask, etdrs_zone_scores,
                                       locate_fovea_and_disc, locate_oct_fovea, oct_zone_scores, optic_disc_zone,
                                       zone_report)


def blob(shape, xy, r):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (np.hypot(xx - xy[0], yy - xy[1]) <= r).astype(np.float32)


def test_centre_lr_shares_sum_to_one_and_follow_the_mass():
    rng = np.random.default_rng(0)
    s = centre_lr_shares(rng.random((60, 80)))
    assert set(s) == {"centre", "left", "right"} and abs(sum(s.values()) - 1) < 1e-9
    c = centre_lr_shares(blob((60, 80), (40, 30), 8))
    assert c["centre"] > 0.9
    left = np.zeros((60, 80), np.float32)
    left[:, :10] = 1
    assert centre_lr_shares(left)["left"] == pytest.approx(1.0)
    flat = centre_lr_shares(np.zeros((64, 64)))            # an empty map: area shares
    assert flat["centre"] == pytest.approx(0.25) and flat["left"] == pytest.approx(0.375)


def test_etdrs_blob_at_fovea_is_central_and_temporal_side_depends_on_the_eye():
    shape, fovea, dd = (200, 200), (100.0, 100.0), 36.0      # 36 px per disc diameter -> 20 px per mm
    at_fovea = etdrs_zone_scores(blob(shape, fovea, 4), fovea, dd, laterality="OD")
    assert at_fovea["central"] > 0.99
    assert abs(sum(at_fovea.values()) - 1) < 1e-9 and len(at_fovea) == 10
    left_2mm = blob(shape, (100 - 40, 100), 3)                 # 2 mm left of the fovea
    od = etdrs_zone_scores(left_2mm, fovea, dd, laterality="OD")   # OD: disc on the right -> left is temporal
    os_ = etdrs_zone_scores(left_2mm, fovea, dd, laterality="OS")
    assert od["outer_temporal"] > 0.99 and os_["outer_nasal"] > 0.99
    left_1mm = blob(shape, (100 - 20, 100), 3)                 # 1 mm: inner ring
    assert etdrs_zone_scores(left_1mm, fovea, dd, laterality="OD")["inner_temporal"] > 0.99
    # the disc position decides nasal when known (disc on the left -> left is nasal), whatever the laterality says
    assert etdrs_zone_scores(left_2mm, fovea, dd, disc_xy=(20, 100))["outer_nasal"] > 0.99
    up = blob(shape, (100, 100 - 40), 3)
    assert etdrs_zone_scores(up, fovea, dd, laterality="OS")["outer_superior"] > 0.99
    far = blob(shape, (10, 10), 3)
    assert etdrs_zone_scores(far, fovea, dd, laterality="OS")["outside"] > 0.99
    with pytest.raises(ValueError):
        etdrs_zone_scores(far, fovea, dd)                      # neither laterality nor disc: nasal is unknown


def test_etdrs_grid_mask_labels_and_mean_mode():
    lab = etdrs_grid_mask((200, 200), (100, 100), 36.0, laterality="OD")
    assert lab.dtype.kind == "i" and set(np.unique(lab)) == set(range(10))
    assert lab[100, 100] == 1 and lab[0, 0] == 0
    assert ETDRS_SUBFIELDS[lab[100, 100 + 40] - 1] == "outer_nasal"   # OD: right of the fovea is nasal
    means = etdrs_zone_scores(np.ones((200, 200)), (100, 100), 36.0, laterality="OD", mode="mean")
    assert all(v == pytest.approx(1.0) for v in means.values())


def test_optic_disc_zone_and_oct_bands():
    hm = blob((100, 100), (80, 50), 5)
    assert optic_disc_zone(hm, (80, 50), 8) == pytest.approx(1.0)
    assert optic_disc_zone(hm, (20, 50), 8) == 0.0
    oct_map = np.zeros((50, 120), np.float32)
    oct_map[:, 58:62] = 1                                      # within 0.5 mm of the fovea at 6 mm / 120 px
    bands = oct_zone_scores(oct_map, fovea_x=60, span_mm=6.0)
    assert bands["central"] == pytest.approx(1.0) and abs(sum(bands.values()) - 1) < 1e-9
    oct_map[:] = 0
    oct_map[:, 20:24] = 1                                      # ~1.9 mm away: perifoveal
    assert oct_zone_scores(oct_map, 60, 6.0)["perifoveal"] == pytest.approx(1.0)


def test_locate_fovea_and_disc_on_skimage_retina():
    from skimage import data

    img = data.retina()                                        # a left eye: its disc is at the left-centre
    lm = locate_fovea_and_disc(img)
    h, w = img.shape[:2]
    dx, dy = lm["disc_xy"]
    fx, fy = lm["fovea_xy"]
    assert dx < 0.3 * w and 0.35 * h < dy < 0.6 * h           # the disc is at x ~ 0.15 w, y ~ 0.45 h
    assert abs(fx - 0.5 * w) < 0.06 * w and abs(fy - 0.49 * h) < 0.06 * h
    assert lm["laterality"] == "OS" and lm["method"] == "heuristic" and 0 <= lm["confidence"] <= 1
    assert 0.03 * w < lm["disc_radius"] < 0.09 * w


def test_locate_fovea_and_disc_on_phantoms_and_meta():
    from retina_core.phantoms import fundus_phantom

    for label, seed in (("normal", 3), ("Moderate", 4)):
        ph = fundus_phantom(label, seed, 192)
        lm = locate_fovea_and_disc(ph.image)
        dd = 2 * ph.meta["disc_radius"]
        assert np.hypot(*np.subtract(lm["disc_xy"], ph.meta["disc_xy"])) < 0.5 * dd
        assert np.hypot(*np.subtract(lm["fovea_xy"], ph.meta["fovea_xy"])) < 1.0 * dd
        truth = locate_fovea_and_disc(ph.image, meta=ph.meta)
        assert truth["method"] == "meta" and truth["disc_xy"] == tuple(ph.meta["disc_xy"])
        assert truth["laterality"] == ph.meta["eye"]


def test_locate_oct_fovea_on_a_normal_phantom_and_zone_report():
    from retina_core.phantoms import fundus_phantom, oct_phantom

    ph = oct_phantom("NORMAL", 304, 256, 192)
    found = locate_oct_fovea(ph.image)
    assert abs(found["fovea_x"] - ph.meta["fovea_x"]) * ph.meta["span_mm"] / 256 < 0.3     # within 0.3 mm
    assert locate_oct_fovea(ph.image, meta=ph.meta)["method"] == "meta"
    rep = zone_report(np.ones((96, 128), np.float32), ph.image, "oct")                   # map smaller than the scan
    assert set(rep) == {"centre_lr", "oct_fovea", "oct"} and abs(sum(rep["oct"].values()) - 1) < 1e-9
    fp = fundus_phantom("normal", 3, 128)
    rep = zone_report(blob((128, 128), fp.meta["fovea_xy"], 3), fp.image, "fundus", meta=fp.meta)
    assert rep["landmarks"]["method"] == "meta" and rep["etdrs"]["central"] > 0.9 and rep["optic_disc"] == 0.0
