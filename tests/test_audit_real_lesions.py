"""Explanations against real lesion masks (IDRiD) and the optic-disc finder against real disc masks.

The real-data tests read ../shared/realdata (or $RETINA_REALDATA) and skip when it is absent; nothing made from those
images is written anywhere. The scoring functions are also checked on hand-made masks, which need no data.
"""
import numpy as np
import pytest
from scipy import stats

from retina_core.audit import real_lesions as rl
from retina_core.io.realsets import realdata_root


def _idrid():
    root = realdata_root()
    if root is None or not (root / "idrid_lesions" / "labels.csv").is_file():
        pytest.skip("real data absent: ../shared/realdata/idrid_lesions (or $RETINA_REALDATA) not found")
    return root / "idrid_lesions"


# ------------------------------------------------------------------------------------------------ no data needed
def test_image_scores_hit_chance_energy_and_tolerance():
    shape = (40, 100)                                        # tolerance = 1% of 100 px = 1 px
    fov = np.zeros(shape, bool)
    fov[:, 10:90] = True                                     # 3200 px field of view
    ma = np.zeros(shape, bool)
    ma[20, 50] = True                                        # one-pixel microaneurysm
    he = np.zeros(shape, bool)
    he[5:15, 20:30] = True                                   # 100 px haemorrhage
    hm = np.zeros(shape, np.float32)
    hm[20, 51] = 1.0                                         # the peak one pixel beside the microaneurysm
    hm[5:15, 20:30] = 0.5
    rand = rl.trust.random_map(shape, 0)
    s = rl.image_scores(hm, {"MA": ma, "HE": he, "OD": np.zeros(shape, bool)}, fov, rand)
    assert s["tolerance_px"] == 1 and "OD" not in s          # an empty mask is not scored
    assert s["energy_outside_fov"] == 0.0 and s["area_outside_fov"] == pytest.approx(0.2)
    assert s["MA"]["pg_0px"] == 0.0 and s["MA"]["pg_tol"] == 1.0     # missed at 0 px, hit within 1 px
    assert s["any"]["pg_tol"] == 1.0 and s["HE"]["pg_0px"] == 0.0
    assert s["any"]["chance_0px"] == pytest.approx(101 / 3200)          # lesion area / FOV area
    assert s["MA"]["chance_tol"] == pytest.approx(5 / 3200)             # the 3x3 ellipse: a plus sign
    assert s["HE"]["energy"] == pytest.approx(50 / 51)
    assert s["any"]["area_image"] == pytest.approx(101 / 4000)
    assert 0 < s["any"]["energy_random_map"] < 0.1
    plateau = np.zeros(shape, np.float32)
    plateau[5, 25:35] = 1.0                                  # ten tied maxima, five of them on the haemorrhage
    tied = rl.image_scores(plateau, {"HE": he}, fov, rand)
    assert tied["HE"]["pg_0px"] == pytest.approx(0.5) and tied["peak_share"] == pytest.approx(10 / 4000)


def test_summary_deletion_drop_and_p_value():
    rows = [{"tolerance_px": 2, "peak_share": 0.001, "energy_outside_fov": 0.0, "area_outside_fov": 0.3, "any": {"pg_0px": h, "pg_tol": h, "chance_0px": 0.1, "chance_tol": 0.2,
                                        "energy": 0.3, "area_image": 0.1, "area_fov": 0.15,
                                        "energy_random_map": 0.1}} for h in (1.0, 1.0, 0.0, 1.0)]
    out = rl.summarise(rows, ["a/IDRiD_01.jpg"] * 4, ["DR"] * 4, [0.9] * 4, [0.5, 0.4, 0.6, 0.5], [0.8] * 4)
    les = out["lesions"]
    assert les["pointing_game_0px"] == 0.75 and les["pointing_game_0px_chance"] == pytest.approx(0.1)
    assert les["pointing_game_0px_p_value"] == pytest.approx(stats.binom.sf(2, 4, 0.1))   # P(>= 3 hits of 4)
    assert les["energy_over_area"] == pytest.approx(3.0)
    assert out["deletion_drop"] == pytest.approx(0.4) and out["deletion_drop_random_map"] == pytest.approx(0.1)
    assert out["deletion_faster_than_random_fraction"] == 1.0 and out["images"][0]["image"] == "IDRiD_01"


def test_masks_keep_tiny_lesions_and_aspect():
    m = np.zeros((1424, 2144), bool)
    m[700, 1000] = True
    small = rl.resize_mask_any(m, rl.keep_aspect(m.shape, 96))
    assert small.shape == (64, 96) and small.sum() >= 1      # nearest resizing would usually lose it


# ------------------------------------------------------------------------------------------------ real data
def test_explain_eval_on_idrid_photographs():
    from retina_core.audit.evaluate import explain_eval
    from retina_core.audit.real_lesions import keep_aspect
    from retina_core.io.datasets import load_dataset
    from retina_core.io.decode import read_image
    from retina_core.models.loading import inference_cfg

    rep = explain_eval("fundus_resnet18_head", _idrid(), methods="gradcam", n=2, steps=4, stability_kinds=(),
                       randomisation=False, target="diabetic_retinopathy")
    assert rep["metric_kind"] == "real_lesions" and rep["target"] == "diabetic_retinopathy"
    side = max(inference_cfg("fundus_resnet18_head").input_size[1:])
    first = read_image(load_dataset(_idrid()).records[0].path).pixels.shape[:2]
    assert rep["eval_size"] == list(keep_aspect(first, side))   # the model's input side, the photographs' aspect
    r = rep["methods"]["gradcam"]["real_lesions"]
    les = r["lesions"]
    assert les["n_images"] == 2 and 0 <= les["pointing_game_0px"] <= les["pointing_game_tol"] <= 1
    assert 0 < les["pointing_game_0px_chance"] <= les["pointing_game_tol_chance"] < 1
    assert les["area_share_image"] < les["area_share_fov"] < 1           # the black rim is not retina
    assert 0 <= les["energy_share"] <= 1 and 0 < les["energy_share_random_map"] < 1
    assert {"MA", "HE", "EX"} <= set(r["by_lesion"]) and r["optic_disc"]["n_images"] == 2
    assert r["deletion_drop"] is not None and r["deletion_drop_random_map"] is not None
    assert len(r["images"]) == 2 and all(0 <= im["p_target"] <= 1 for im in r["images"])
    od = rep["optic_disc_detection"]
    assert od["n_images"] == 2 and od["max_dd"] <= 0.25


def test_disc_finder_on_the_idrid_disc_masks():
    """All 10 photographs (a few seconds): the found disc centre within a quarter disc diameter of the OD mask's
    centroid on each (measured: mean 0.05, max 0.14 disc diameters)."""
    from retina_core.io.datasets import load_dataset, record_lesion_masks
    from retina_core.io.decode import read_image

    rows = []
    for rec in load_dataset(_idrid()).records:
        px = read_image(rec.path).pixels
        rows.append(rl.disc_error(px, record_lesion_masks(rec, px.shape[:2], kinds=["OD"])["OD"]))
    s = rl.summarise_disc_errors(rows, [str(r) for r in range(len(rows))])
    assert s["n_images"] == 10 and s["meets_target"] and s["max_dd"] <= 0.25
    assert 0.7 < s["radius_ratio_mean"] < 1.3
