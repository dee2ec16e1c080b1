"""explain-eval for the OCT volume model (3-D Grad-CAM) and the fundus + OCT fusion model (per-modality Grad-CAM):
the 3-D localisation helpers on hand-built maps, report keys and ranges on tiny random-init models and tiny phantoms,
the randomisation rho, clear errors for the wrong data, and the CLI on the bundled volume weights."""
import json

import numpy as np
import pytest
import torch

from retina_core.errors import RetinaInputError
from retina_core.audit import trust
from retina_core.audit.common import passes_randomisation, rank_methods
from retina_core.audit.evaluate import explain_eval
from retina_core.models import create_model, get_cfg

VOLUME = "oct_volume_fusion3d_tiny"


# ------------------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def volume_phantoms():
    from retina_core.phantoms import oct_volume

    return [oct_volume(lab, seed=s, n_slices=16, height=32, width=32)
            for lab, s in (("disease", 1), ("normal", 2), ("disease", 3))]


@pytest.fixture(scope="module")
def tiny_fusion_net():
    torch.manual_seed(0)
    kw = {**get_cfg("fundus_oct_fusion").builder_kwargs, "load_encoders": False, "encoder_input_size": (3, 64, 64)}
    return create_model("fundus_oct_fusion", builder_kwargs=kw).eval()


@pytest.fixture(scope="module")
def pair_phantoms():
    from retina_core.phantoms import paired_phantoms

    return [paired_phantoms(s, fundus_size=64, oct_width=64, oct_height=64, disease=d)
            for s, d in ((1, True), (2, False), (3, True))]


@pytest.fixture(scope="module")
def volume_dir(tmp_path_factory):
    from retina_core.phantoms import write_dataset

    out = tmp_path_factory.mktemp("vols") / "volumes"
    write_dataset("oct-volume", n=6, seed=3, out=out, size=32)
    return out


@pytest.fixture(scope="module")
def paired_dir(tmp_path_factory):
    from retina_core.phantoms import write_dataset

    out = tmp_path_factory.mktemp("pairs") / "paired"
    write_dataset("paired", n=4, seed=3, out=out, size=64)
    return out


def _in01(x):
    return x is not None and -1e-9 <= x <= 1 + 1e-9


# ------------------------------------------------------------------------------------------------ 3-D helpers
def _lesion_mask():
    m = np.zeros((6, 40, 40), bool)
    m[2, 10:14, 10:14] = True
    return m


def test_pointing_game_3d_peak_inside_and_outside_the_mask():
    mask = _lesion_mask()
    hm = np.zeros(mask.shape, np.float32)
    hm[2, 12, 12] = 1.0                                      # on the lesion
    assert trust.pointing_game_3d(hm, mask) is True
    hm[:] = 0
    hm[2, 35, 35] = 1.0                                      # same slice, far away
    assert trust.pointing_game_3d(hm, mask) is False
    hm[:] = 0
    hm[2, 16, 12] = 1.0                                      # 2 px beside the lesion: inside the in-plane tolerance
    assert trust.pointing_game_3d(hm, mask, tolerance_px=3) is True
    assert trust.pointing_game_3d(hm, mask, tolerance_px=0) is False
    hm[:] = 0
    hm[3, 12, 12] = 1.0                                      # right above it, next slice: no tolerance across slices
    assert trust.pointing_game_3d(hm, mask, tolerance_px=5) is False
    assert trust.pointing_game_3d(np.zeros(mask.shape), mask) is False   # an empty map points nowhere
    with pytest.raises(ValueError):
        trust.pointing_game_3d(hm, np.zeros(mask.shape, bool))
    with pytest.raises(ValueError):
        trust.pointing_game_3d(hm[0], mask)


def test_pointing_game_3d_ties_energy_slice_hit_and_chance():
    mask = _lesion_mask()
    hm = np.zeros(mask.shape, np.float32)
    hm[2, 12, 12] = hm[5, 35, 35] = 1.0                       # a tie: one peak on the lesion, one far away
    assert trust.pointing_game_3d(hm, mask, tolerance_px=0) is True
    assert trust.pointing_game_3d_tiebreak(hm, mask, tolerance_px=0) == pytest.approx(0.5)
    e = np.zeros(mask.shape, np.float32)
    e[2, 10:14, 10:14] = 1.0
    e[4, 0:4, 0:4] = 3.0
    assert trust.energy_pointing_game_3d(e, mask) == pytest.approx(16 / 64)
    assert trust.slice_hit(e, mask) == 0.0                    # slice 4 has the most mass and no lesion
    e[4] = 0
    assert trust.slice_hit(e, mask) == 1.0
    flat = np.ones(mask.shape, np.float32)                    # the same on every slice: expected hit of a tie-break
    assert trust.slice_hit(flat, mask) == pytest.approx(1 / 6)
    assert trust.pointing_game_3d_chance(mask, tolerance_px=0) == pytest.approx(mask.mean())
    assert trust.pointing_game_3d_chance(mask, tolerance_px=2) > mask.mean()


# ------------------------------------------------------------------------------------------------ volumes
@pytest.fixture(scope="module")
def volume_report(tiny_volume_net, volume_phantoms):
    from retina_core.explain.volume_methods import VOLUME_METHODS

    return explain_eval(tiny_volume_net, phantoms=volume_phantoms, methods=",".join(VOLUME_METHODS), n=3,
                        steps=4, stability_kinds=("noise", "shift"))


@pytest.fixture(scope="module")
def fusion_report(tiny_fusion_net, pair_phantoms):
    return explain_eval(tiny_fusion_net, phantoms=pair_phantoms, methods="gradcam,integrated_gradients", n=3,
                        steps=4, stability_kinds=("noise",))


def test_volume_report_keys_ranges_and_ranking(volume_report):
    rep = volume_report
    assert rep["modality"] == "oct_volume" and rep["n_images"] == 3 and rep["eval_size"] == [16, 32, 32]
    assert set(rep["methods"]) == {"gradcam", "gradcam-reference", "gradcam++", "hirescam", "xgradcam", "layercam",
                                   "eigencam", "scorecam", "integrated_gradients"}
    for meth, r in rep["methods"].items():
        assert r["n_lesion_images"] == 2 and r["map_grid"] == [2, 4, 4]
        for k in ("pointing_game", "pointing_game_tiebreak", "pointing_game_chance", "energy_pointing_game",
                  "slice_hit_rate", "slice_hit_baseline", "empty_map_fraction", "stability_ssim"):
            assert _in01(r[k]), (meth, k, r[k])
        assert r["pointing_game_tiebreak"] <= r["pointing_game"]
        assert 0 < r["pointing_game_chance"] < 0.5 and 0 < r["slice_hit_baseline"] <= 1
        assert set(r["stability"]) == {"noise", "shift"}
        assert -1 <= r["stability_spearman"] <= 1
        assert r["n_randomisation_images"] == 3 and r["randomisation_abs_spearman"] is not None
        assert abs(r["randomisation_spearman"]) <= r["randomisation_abs_spearman"] <= 1
        assert r["deletion_auc"] is None or (_in01(r["deletion_auc"]) and _in01(r["insertion_auc"])
                                             and _in01(r["deletion_auc_random_map"])
                                             and r["faithful_vs_random"] == (r["deletion_auc"]
                                                                             < r["deletion_auc_random_map"]))
        assert r["cost_vs_forward"] > 0 and r["seconds_per_image"] > 0
        assert passes_randomisation(r) in (True, False)
        # the pointing game over the image-led suggestions: a subset of the lesion volumes
        assert 0 <= r["n_lesion_images_image_led"] <= r["n_lesion_images"]
        assert (r["pointing_game_image_led"] is None) == (r["n_lesion_images_image_led"] == 0)
    # which inputs the suggestions rest on (Shapley over the image and the clinical values)
    ins = rep["inputs"]
    assert _in01(ins["image_led_fraction"])
    for lab, row in ins["by_label"].items():
        assert row["n_called_disease"] >= 1 and set(row["mean_share"]) >= {"image", "hba1c"}
        assert sum(row["mean_share"].values()) == pytest.approx(1.0, abs=1e-6) or sum(row["mean_share"].values()) == 0
    assert [d["method"] for d in rep["ranking"]] == [d["method"] for d in rank_methods(rep["methods"])]
    assert all(d["mean_rank"] is not None for d in rep["ranking"])
    json.dumps(rep)                                           # JSON-ready


def test_volume_randomisation_rho_is_computed_from_the_maps(tiny_volume_net, volume_phantoms):
    """The same network as its own 'randomised' copy gives identical maps (rho 1, fails the check); really
    randomised weights give a different number."""
    from retina_core.audit import evaluate_nd as nd

    m = nd.resolve_net(tiny_volume_net)
    samples = nd.volume_samples_from_phantoms(m, volume_phantoms)
    same = nd.evaluate_volume_method(m, samples, "gradcam", rnet=tiny_volume_net, steps=0, stability_kinds=())
    assert same["randomisation_spearman"] == pytest.approx(1.0) and same["randomisation_abs_spearman"] == \
        pytest.approx(1.0)
    assert passes_randomisation(same) is False
    rnet = trust.randomise_parameters(__import__("copy").deepcopy(tiny_volume_net), seed=1).eval()
    other = nd.evaluate_volume_method(m, samples, "gradcam", rnet=rnet, steps=0, stability_kinds=())
    assert other["randomisation_abs_spearman"] < 0.99
    assert other["deletion_auc"] is None and other["stability_ssim"] is None   # steps=0, no perturbations


def test_volume_deletion_insertion_follows_the_map():
    """A predictor that reads the mean of a 'lesion' block: deleting in the map's order (block first) drops it
    fast, inserting brings it back fast; the reversed map does the opposite."""
    from retina_core.audit.evaluate_nd import volume_deletion_insertion

    vol = np.zeros((8, 32, 32), np.float32)
    vol[3:5, 8:16, 8:16] = 1.0

    def predict(v):
        return v[:, 3:5, 8:16, 8:16].reshape(len(v), -1).mean(1)

    good = volume_deletion_insertion(predict, vol, vol.copy(), steps=8)
    bad = volume_deletion_insertion(predict, vol, 1.0 - vol, steps=8)
    assert good["deletion_auc"] < bad["deletion_auc"] and good["insertion_auc"] > bad["insertion_auc"]


# ------------------------------------------------------------------------------------------------ fusion
def test_fusion_report_per_modality(fusion_report):
    rep = fusion_report
    assert rep["modality"] == "fundus+oct" and rep["eval_size"] == {"fundus": [64, 64], "oct": [64, 64]}
    r = rep["methods"]["gradcam"]
    for mod in ("fundus", "oct"):
        assert r[f"n_lesion_images_{mod}"] == 2
        for k in ("pointing_game", "pointing_game_chance", "energy_pointing_game", "empty_map_fraction"):
            assert _in01(r[f"{k}_{mod}"]), (k, mod)
        assert r[f"map_grid_{mod}"] == [2, 2]
        if r[f"empty_map_fraction_{mod}"] < 1:
            assert r[f"randomisation_abs_spearman_{mod}"] is not None
            assert _in01(r[f"deletion_auc_{mod}"]) and _in01(r[f"insertion_auc_{mod}"])
            assert _in01(r[f"deletion_auc_random_map_{mod}"]) and r[f"faithful_vs_random_{mod}"] == (
                r[f"deletion_auc_{mod}"] < r[f"deletion_auc_random_map_{mod}"])
    assert r["n_lesion_images"] == 4
    pooled = (2 * r["pointing_game_fundus"] + 2 * r["pointing_game_oct"]) / 4
    assert r["pointing_game"] == pytest.approx(pooled)
    worst = max(r["randomisation_abs_spearman_fundus"], r["randomisation_abs_spearman_oct"])
    assert r["randomisation_abs_spearman"] == pytest.approx(worst)
    assert not any("share" in k for k in r)                  # no per-modality share of attribution is invented
    assert any("normalised separately" in n for n in rep["notes"])
    ig = rep["methods"]["integrated_gradients"]                # IG on both inputs, scored the same way
    assert ig["n_lesion_images"] == 4 and _in01(ig["pointing_game"]) and ig["cost_vs_forward"] > 0
    assert [d["method"] for d in rep["ranking"]] and {d["method"] for d in rep["ranking"]} <= set(rep["methods"])
    json.dumps(rep)


def test_fusion_fixed_partner_predictions_match_the_full_forward(tiny_fusion_net, pair_phantoms):
    from retina_core.audit import evaluate_nd as nd

    m = nd.resolve_net(tiny_fusion_net)
    s = nd.pair_samples_from_phantoms(m, pair_phantoms)[0]
    probs, _, _ = nd.pair_maps(m, m.net, s.fundus, s.oct)
    assert np.allclose(nd.pair_predict_fn(m, "fundus", s.oct)(s.fundus[None])[0], probs, atol=1e-5)
    assert np.allclose(nd.pair_predict_fn(m, "oct", s.fundus)(s.oct[None])[0], probs, atol=1e-5)


def test_fusion_report_is_read_by_method_trust(fusion_report, tmp_path):
    import retina_core.audit.evidence as qe

    rep = {**fusion_report, "weights_sha256": "abc"}      # kept as evidence with (stand-in) weights
    (tmp_path / "evidence").mkdir()
    p = tmp_path / "evidence" / "ee_fusion.json"
    p.write_text(json.dumps(rep))
    ev = qe.method_trust(rep["model"], "abc", weights_dir=tmp_path)
    assert set(ev) == {"gradcam", "integrated_gradients"}
    assert ev["gradcam"]["randomisation_abs_spearman"] == rep["methods"]["gradcam"]["randomisation_abs_spearman"]
    assert ev["gradcam"]["pointing_game"] == rep["methods"]["gradcam"]["pointing_game"]
    # each input's map has its own figures and its own note
    for mod in ("fundus", "oct"):
        sub = qe.modality_evidence(ev["gradcam"], mod)
        assert sub["deletion_auc"] == rep["methods"]["gradcam"][f"deletion_auc_{mod}"]
        assert sub["faithful_vs_random"] == rep["methods"]["gradcam"][f"faithful_vs_random_{mod}"]
        assert sub["source"] == p.name
    bad = json.loads(json.dumps(ev["gradcam"]))
    bad["by_modality"]["oct"].update(faithful_vs_random=False, deletion_auc=0.9, deletion_auc_random_map=0.8,
                                     randomisation_abs_spearman=0.1, randomisation_empty_fraction=0.0)
    bad["by_modality"]["fundus"].update(faithful_vs_random=True, deletion_auc=0.3, deletion_auc_random_map=0.8,
                                        randomisation_abs_spearman=0.1, randomisation_empty_fraction=0.0,
                                        pointing_game=1.0)
    note, warn = qe.trust_note(bad, "gradcam", modality="oct")
    assert warn and "gradcam on the OCT image **is no more faithful than chance**" in note and "0.90 against 0.80" in note
    assert "rests mainly on the other image" not in note
    bad["by_modality"]["oct"].update(deletion_auc=0.97, deletion_auc_random_map=0.95)
    assert "barely moves the model's score (deletion AUC 0.95 or more)" in qe.trust_note(bad, "gradcam",
                                                                                          modality="oct")[0]
    note, warn = qe.trust_note(bad, "gradcam", modality="fundus")
    assert not warn and "on the fundus image passed" in note and "0.30 against 0.80" in note
    # counterfactual pairs: where the OCT carries the call (fundus lesions gone), is its map faithful then?
    bad["faithful_alone"] = {"oct": {"n": 20, "deletion_auc": 0.41, "deletion_auc_random_map": 0.66,
                                     "faithful_vs_random": True}, "fundus": None}
    bad["by_modality"]["oct"]["pointing_game"] = 0.75       # (the tiny random net's own figure may be anything)
    note, warn = qe.trust_note(bad, "gradcam", modality="oct")
    assert ("Where this image carries the call (20 phantom pairs re-rendered without the fundus photograph's "
            "lesions), removing what the map marks lowers the score faster than removing random regions (deletion "
            "AUC 0.41 against 0.66): this map is faithful when this image decides.") in note
    # ...so the plain test's "no better than chance" (the fundus decides first) is explained, not a warning
    assert not warn and "no more faithful than chance" not in note and "already decide the output" in note
    bad["faithful_alone"]["oct"].update(faithful_vs_random=False, deletion_auc=0.7)
    note, warn = qe.trust_note(bad, "gradcam", modality="oct")
    assert warn and "**is no more faithful than chance**" in note and "even then this map is no more faithful" in note
    assert "carries the call" not in qe.trust_note(bad, "gradcam", modality="fundus")[0]
    # a saturated input with counterfactual pairs: the note says the other image's lesions decide first, and does
    # not claim the suggestion rests on the other image
    bad["by_modality"]["fundus"].update(deletion_auc=0.91, deletion_auc_random_map=0.97)
    bad["faithful_alone"]["fundus"] = {"n": 12, "deletion_auc": 0.38, "deletion_auc_random_map": 0.95,
                                       "faithful_vs_random": True}
    note, warn = qe.trust_note(bad, "gradcam", modality="fundus")
    assert not warn and "barely moves the model's score (deletion AUC 0.91 or more)" in note
    assert "its lesions already decide the output" in note and "rests mainly on the other image" not in note
    assert "this map is faithful when this image decides" in note
    assert qe.modality_evidence({"pointing_game": 1.0}, "oct") is None


# ------------------------------------------------------------------------------------------------ bad input
def test_wrong_data_and_methods_give_clear_errors(tiny_volume_net, tiny_fusion_net, volume_phantoms, pair_phantoms,
                                                  volume_dir, paired_dir, tmp_path):
    with pytest.raises(RetinaInputError, match="reads OCT volumes"):
        explain_eval(tiny_volume_net, paired_dir, n=2)
    with pytest.raises(RetinaInputError, match="reads fundus \\+ OCT pairs"):
        explain_eval(tiny_fusion_net, volume_dir, n=2)
    with pytest.raises(RetinaInputError, match="does not exist"):
        explain_eval(tiny_volume_net, tmp_path / "nowhere", n=2)
    with pytest.raises(RetinaInputError, match="volume phantoms"):
        explain_eval(tiny_volume_net, phantoms=pair_phantoms, n=2)
    with pytest.raises(RetinaInputError, match="phantom pairs"):
        explain_eval(tiny_fusion_net, phantoms=volume_phantoms, n=2)
    with pytest.raises(RetinaInputError, match="gradcam, gradcam-reference, gradcam\\+\\+, .* only"):
        explain_eval(tiny_volume_net, phantoms=volume_phantoms, methods="vit_relevance", n=2)
    with pytest.raises(RetinaInputError, match="gradcam, integrated_gradients only"):
        explain_eval(tiny_fusion_net, phantoms=pair_phantoms, methods="gradcam-reference", n=2)
    with pytest.raises(RetinaInputError, match="split"):
        explain_eval(tiny_volume_net, volume_dir, n=2, split="holdout")


def test_samples_from_disk_read_the_masks_and_the_test_split(tiny_volume_net, tiny_fusion_net, volume_dir,
                                                             paired_dir):
    from retina_core.audit import evaluate_nd as nd

    m = nd.resolve_net(tiny_volume_net)
    every, used = nd.volume_samples_from_dataset(m, volume_dir, 10, split="all")
    assert used == "all" and len(every) == 6
    assert all(s.volume.shape == (16, 32, 32) and s.mask.shape == (16, 32, 32) for s in every)
    assert any(s.mask.any() for s in every if s.label == "disease")
    assert not any(s.mask.any() for s in every if s.label == "normal")
    test, used = nd.volume_samples_from_dataset(m, volume_dir, 10)
    assert used == "test" and 0 < len(test) < 6
    f = nd.resolve_net(tiny_fusion_net)
    pairs, _ = nd.pair_samples_from_dataset(f, paired_dir, 4, split="all")
    assert len(pairs) == 4 and all(p.fundus.shape == (64, 64, 3) and p.oct_mask.shape == (64, 64) for p in pairs)
    assert any(p.fundus_mask.any() and p.oct_mask.any() for p in pairs if p.label == "disease")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_volume_model_with_bundled_weights(volume_dir, paired_dir, capsys):
    from retina_core.cli import main
    from retina_core.models.loading import read_manifest, weights_dir

    if VOLUME not in read_manifest(weights_dir()):
        pytest.skip("no bundled weights for the volume model")
    code = main(["explain-eval", "--model", VOLUME, "--data", str(volume_dir), "--n", "4", "--split", "all",
                 "--steps", "4", "--counterfactual", "--no-evidence", "--json"])   # never into the repo's weights/
    out = capsys.readouterr().out
    assert code == 0
    rep = json.loads(out)
    r = rep["methods"]["gradcam"]
    assert rep["model"] == VOLUME and rep["n_images"] == 4 and rep["split"] == "all"
    assert "evidence_written_to" not in rep                # --no-evidence: the bundled evidence is left alone
    assert rep["weights_sha256"] == read_manifest(weights_dir())[VOLUME]["sha256"]
    assert r["n_lesion_images"] >= 1 and _in01(r["pointing_game"]) and _in01(r["slice_hit_baseline"])
    assert "randomisation_abs_spearman" in r and r["cost_vs_forward"] > 0
    cf = rep["counterfactual"]                      # the same draw of volumes, its diseased ones re-rendered
    assert cf["split"] == "all" and r["n_lesion_images"] <= cf["n_volumes"] <= 4
    assert all(_in01(s["original"]["p_disease"]) for s in cf["per_class"].values())
    code = main(["explain-eval", "--model", VOLUME, "--data", str(paired_dir), "--n", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "reads OCT volumes" in err and "Traceback" not in err


def test_fusion_pools_both_modalities_for_the_overall_scores(tiny_fusion_net, pair_phantoms, monkeypatch):
    """Fundus hits, OCT misses (a stubbed pointing game): per modality 1 and 0, overall their pooled mean 0.5."""
    from retina_core.audit import evaluate_nd as nd

    m = nd.resolve_net(tiny_fusion_net)
    samples = nd.pair_samples_from_phantoms(m, pair_phantoms)
    fundus_masks = {id(s.fundus_mask) for s in samples}
    monkeypatch.setattr(trust, "pointing_game", lambda hm, mask, *a, **k: id(mask) in fundus_masks)
    r = nd.evaluate_fusion_method(m, samples, "gradcam", steps=0, stability_kinds=())
    assert r["pointing_game_fundus"] == 1.0 and r["pointing_game_oct"] == 0.0 and r["pointing_game"] == 0.5


# ------------------------------------------------------------------------------------------------ counterfactuals
def test_counterfactual_phantoms_leave_out_only_what_they_name():
    from retina_core.phantoms import oct_volume

    a = oct_volume("DR", 0, 16, 64, 64)
    b = oct_volume("DR", 0, 16, 64, 64, without=("ellipsoids",))
    c = oct_volume("DR", 0, 16, 64, 64, without=("thickening",))
    assert a.masks["foci"].any() and not b.masks          # the foci (the DR eye's only masked lesion) are gone
    changed = a.image != b.image
    under_foci = a.masks["foci"].any(axis=1)[:, None, :]  # A-scans (slice, x) through a focus
    assert changed.any() and not (changed & ~under_foci).any()   # nothing else of the eye moved
    # no swelling: a thinner centre, the same foci A-scans (their depth follows the layers)
    assert c.meta["cst_um"] < a.meta["cst_um"] - 10
    assert np.array_equal(c.masks["foci"].any(axis=1), a.masks["foci"].any(axis=1))
    assert np.array_equal(oct_volume("DR", 0, 16, 64, 64).image, a.image)   # re-rendering is exact
    with pytest.raises(ValueError, match="unknown part 'vessels'"):
        oct_volume("DR", 0, 16, 64, 64, without=("vessels",))


def test_counterfactual_report_compares_the_same_eyes(tiny_volume_net, volume_dir, monkeypatch):
    """With a stand-in P(disease) = mean intensity of the volume, every figure can be recomputed from the phantoms."""
    import csv

    from retina_core.audit import counterfactual as cf
    from retina_core.audit.common import resize_volume
    from retina_core.phantoms import oct_volume

    monkeypatch.setattr(cf, "volume_map", lambda m, net, x, meta_t, method: (float(x.mean()), x / x.max()))
    monkeypatch.setattr(cf, "volume_predict_fn", lambda m, meta_t: (lambda v: [float(v.mean()) * 0.5]))
    rep = cf.volume_lesion_reliance(tiny_volume_net, volume_dir, split="all")
    rows = [r for r in csv.DictReader(open(volume_dir / "phantom_meta.csv")) if r["oct_class"] != "NORMAL"]
    assert rep["n_volumes"] == len(rows) == sum(s["n"] for s in rep["per_class"].values())

    def p(r, without=()):
        v = oct_volume(r["oct_class"], int(r["seed"]), 32, 32, 32, without=without).image
        return float(resize_volume(v, (16, 32, 32)).mean())

    for cls, s in rep["per_class"].items():
        mine = [r for r in rows if r["oct_class"] == cls]
        assert s["original"]["p_disease"] == pytest.approx(np.mean([p(r) for r in mine]), abs=1e-6)
        assert s["original"]["p_disease_no_record"] == pytest.approx(s["original"]["p_disease"] * 0.5, abs=1e-6)
        for name, without in (("without_masked", ("masked",)), ("without_ellipsoids", ("ellipsoids",)),
                              ("without_thickening", ("thickening",))):
            drops = [p(r) - p(r, without) for r in mine if p(r, without) != p(r)]
            if not drops:
                assert s[name] is None              # nothing of that kind in these eyes
            else:
                assert s[name]["n"] == len(drops) and s[name]["drop"] == pytest.approx(np.mean(drops), abs=1e-6)
    assert "\n".join(cf.format_lines(rep)).count("\n") == len(rep["per_class"]) + 2
    rows = cf.table_rows(rep)                       # the app's table: one row per class, the same figures
    assert [r["class"] for r in rows] == list(rep["per_class"])
    for r in rows:
        s = rep["per_class"][r["class"]]
        assert r["P original"] == s["original"]["p_disease"]
        assert r["drop no cysts/foci, no record"] == (s["without_ellipsoids"] or {}).get("drop_no_record")


def test_counterfactual_refuses_what_it_cannot_re_render(tiny_volume_net, volume_dir, tmp_path, capsys):
    import csv
    import shutil

    import nibabel as nib

    from retina_core.cli import main
    from retina_core.audit.counterfactual import volume_lesion_reliance

    bare = tmp_path / "bare"
    shutil.copytree(volume_dir, bare)
    (bare / "phantom_meta.csv").unlink()
    with pytest.raises(RetinaInputError, match="no phantom_meta.csv"):
        volume_lesion_reliance(tiny_volume_net, bare)
    edited = tmp_path / "edited"                           # one diseased volume no longer what its seed draws
    shutil.copytree(volume_dir, edited)
    row = next(r for r in csv.DictReader(open(edited / "phantom_meta.csv")) if r["oct_class"] != "NORMAL")
    img = nib.load(edited / row["path"])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32)[::-1].copy(), img.affine), edited / row["path"])
    with pytest.raises(RetinaInputError, match="does not re-render from its seed"):
        volume_lesion_reliance(tiny_volume_net, edited)
    code = main(["explain-eval", "--model", "fundus_oct_fusion", "--data", str(volume_dir), "--counterfactual"])
    err = capsys.readouterr().err
    assert code == 2 and "reads fundus + OCT pairs" in err and "Traceback" not in err


def test_pair_counterfactual_leaves_out_each_input_s_lesions(tiny_fusion_net, monkeypatch, tmp_path):
    """Fusion model: the same eye with the fundus photograph's, the OCT B-scan's or both images' lesions left out.
    A stand-in P(disease) = 0.5 + 0.25 x mean fundus + 0.25 x mean OCT intensity lets every figure be recomputed."""
    import csv

    from retina_core.audit import counterfactual as cf
    from retina_core.audit import evaluate_nd as nd
    from retina_core.audit.common import resize_2d
    from retina_core.phantoms import write_dataset
    from retina_core.phantoms.fundus import fundus_phantom
    from retina_core.phantoms.oct import oct_phantom

    root = tmp_path / "pairs"
    write_dataset("paired", n=8, seed=5, out=root, size=64)

    def fake_maps(m, net, f, o, target=None):
        p = 0.5 + 0.25 * f.mean() / 255.0 + 0.25 * o.mean() / 255.0     # above 0.5: every variant is called
        return np.array([1 - p, p]), 1, {"fundus": f.mean(-1) / 255.0, "oct": o.mean(-1) / 255.0}

    monkeypatch.setattr(nd, "pair_maps", fake_maps)
    rep = cf.pair_lesion_reliance(tiny_fusion_net, root, split="all")
    rows = {r["path"]: r for r in csv.DictReader(open(root / "phantom_meta.csv"))}
    pairs = [r for r in csv.DictReader(open(root / "pairs.csv")) if r["label"] == "disease"]
    assert rep["modality"] == "fundus+oct" and rep["n_volumes"] == len(pairs) > 0
    m = nd.resolve_net(tiny_fusion_net)

    def p(pair, wf=(), wo=()):
        out = []
        for mod, without, size in (("fundus", wf, m.net.fundus_cfg.input_size[1:]),
                                   ("oct", wo, m.net.oct_cfg.input_size[1:])):
            row = rows[pair[mod]]
            f_cls, o_cls = cf._pair_row_classes(rows[pair["fundus"]])
            pat = {"patient_id": row["patient_id"], "eye": row["eye"], "age": int(row["age"]), "sex": row["sex"]}
            img = (fundus_phantom(f_cls, int(row["seed"]), 64, patient=pat, without=without).image if mod == "fundus"
                   else oct_phantom(o_cls, int(row["seed"]), 64, 64, patient=pat, without=without).image)
            out.append(resize_2d(cf.to_pixels(img), None, tuple(size))[0].mean() / 255.0)
        return 0.5 + 0.25 * out[0] + 0.25 * out[1]

    everyone = [(pair, p(pair)) for pair in pairs]
    assert sum(s["original"]["p_disease"] * s["n"] for s in rep["per_class"].values()) == pytest.approx(
        sum(v for _, v in everyone), abs=1e-6)
    both = [v - p(pair, ("masked",), ("masked",)) for pair, v in everyone]
    assert sum(s["without_both_lesions"]["drop"] * s["without_both_lesions"]["n"] for s in rep["per_class"].values()
               if s["without_both_lesions"]) == pytest.approx(sum(both), abs=1e-6)
    for s in rep["per_class"].values():               # each input's map scored on its own lesions
        assert _in01(s.get("pointing_game_fundus")) and s["pointing_game"] is None
    # each map scored where its input carries the call (the other's lesions gone; the tiny net's own predictions)
    for mod, variant in (("oct", "without_fundus_lesions"), ("fundus", "without_oct_lesions")):
        a = rep["faithful_alone"][mod]
        n_changed = sum(s[variant]["n"] for s in rep["per_class"].values() if s[variant])
        assert a["n"] == n_changed and _in01(a["deletion_auc"]) and _in01(a["deletion_auc_random_map"])
        assert a["faithful_vs_random"] == (a["deletion_auc"] < a["deletion_auc_random_map"])
    table = cf.table_rows(rep)
    assert all("pointing game fundus" in t and "P no OCT lesions" in t for t in table)
    assert "with the OCT B-scan's lesions left out" in cf.describe_variants(rep)
