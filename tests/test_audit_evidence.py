"""The explain-eval evidence kept with the weights: written by explain-eval (`audit.evaluate`: tagged, merged,
refused for unknown weights), read back (`audit.evidence.method_trust`: these weights only, the largest report per
method, real sets first) and worded as the trust notes and badges the app shows under a heatmap."""
import pytest


def _write(path, obj):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _phantom_report(sha="abc", n=40, rho=0.2, pg=0.9):
    return {"model": "m", "weights_sha256": sha, "n_images": n, "metric_kind": "phantom", "data": "/tmp/phantoms",
            "methods": {"gradcam": {"randomisation_abs_spearman": rho, "randomisation_empty_fraction": 0.0,
                                    "pointing_game": pg, "deletion_auc": 0.3, "deletion_auc_random_map": 0.6,
                                    "faithful_vs_random": True, "n_images": n}}}


def _real_report(sha="abc", pg=0.5, chance=0.19, p=0.02, drop=0.59, drop_rand=0.23, outside=0.22, target=None,
                 rho=0.22):
    """An explain-eval report on a real lesion set, in the shape `real_lesions.summarise` writes."""
    lesions = {"n_images": 10, "pointing_game_0px": 0.3, "pointing_game_0px_chance": 0.06,
               "pointing_game_tol": pg, "pointing_game_tol_chance": chance, "pointing_game_tol_p_value": p,
               "energy_share": 0.06, "area_share_image": 0.04}
    rl = {"tolerance_px": 3, "lesions": lesions, "by_lesion": {}, "p_target": 0.93, "deletion_drop": drop,
          "deletion_drop_random_map": drop_rand, "energy_outside_fov": outside, "area_outside_fov": 0.30,
          "images": [{"image": "IDRiD_01"}]}
    return {"model": "m", "weights_sha256": sha, "n_images": 10, "metric_kind": "real_lesions", "target": target,
            "data": "../shared/realdata/idrid_lesions",
            "methods": {"gradcam": {"randomisation_abs_spearman": rho, "randomisation_empty_fraction": 0.0,
                                    "pointing_game": pg, "deletion_auc": 0.33, "deletion_auc_random_map": 0.70,
                                    "faithful_vs_random": drop > drop_rand, "n_images": 10, "real_lesions": rl}}}


def _note(weights_dir, label=None, sha="abc"):
    from retina_core.audit.evidence import method_trust, trust_note

    return trust_note(method_trust("m", sha, weights_dir=weights_dir).get("gradcam"), "gradcam", label)


def test_a_doc_edit_or_file_times_do_not_change_the_note(tmp_path, monkeypatch):
    """The note reads <weights dir>/evidence only: a bigger report under docs/ (or loose in weights/), edited or
    touched, changes nothing; neither do file times."""
    import os

    from retina_core.evaluate import ensemble

    w = tmp_path / "weights"
    _write(w / "evidence" / "m-abc-phantoms.json", _phantom_report())
    before = _note(w)
    doc = _write(tmp_path / "docs" / "explain_eval_m.json", _phantom_report(n=500, rho=0.9, pg=0.1))
    _write(w / "explain_eval_m.json", _phantom_report(n=500, rho=0.9, pg=0.1))
    assert _note(w) == before and "90%" in before[0] and "m-abc-phantoms.json" in before[0]
    doc.write_text(doc.read_text().replace("0.9", "0.95"))
    os.utime(doc, (10 ** 10, 10 ** 10))
    assert _note(w) == before
    # two evidence files of one kind and size: the file name decides, whichever is newer
    _write(w / "evidence" / "m-abc-zzz.json", _phantom_report(pg=0.2))
    for t in ((1, 1), (10 ** 10, 10 ** 10)):
        os.utime(w / "evidence" / "m-abc-zzz.json", t)
        assert _note(w) == before
    # and nothing scans the project's folders at run time
    monkeypatch.setattr(ensemble, "saved_reports", lambda *a, **k: pytest.fail("docs/ scanned"))
    assert _note(w) == before


def test_real_evidence_is_worded_as_real_and_comes_first(tmp_path):
    import re

    w = tmp_path / "weights"
    _write(w / "evidence" / "m-abc-idrid_lesions.json", _real_report())
    note, warn = _note(w)
    assert not warn and note.startswith("gradcam on 10 real IDRiD photographs: its peak fell on a marked lesion "
                                        "50% of the time (a random point in the field of view: 19%, p = 0.02)")
    assert "deleting what it marks lowers P(predicted class), 0.93 on average, by 0.59 against 0.23" in note
    assert "phantom" not in note and "deletion AUC" not in note and "0.22 on these photographs" in note
    # with phantom evidence too: the real figures first, the phantom sanity check added, labelled as such
    _write(w / "evidence" / "m-abc-phantoms.json", _phantom_report(n=400, rho=0.12))
    both, warn = _note(w)
    assert not warn and both.startswith("gradcam on 10 real IDRiD photographs")
    assert "0.22 on these photographs, 0.12 on synthetic phantoms" in both and "phantom lesion" not in both
    from retina_core.audit.evidence import method_trust, trust_badge

    assert trust_badge(method_trust("m", "abc", weights_dir=w)["gradcam"]) == \
        "sanity check passed on real photographs (|rho| 0.22)"
    # phantom evidence alone: said so, and never called real
    (w / "evidence" / "m-abc-idrid_lesions.json").unlink()
    phantom, warn = _note(w)
    assert not warn and "measured on synthetic phantoms only" in phantom and not re.search(r"\breal\b", phantom)


def test_real_images_without_lesion_masks_give_a_real_sanity_and_faithfulness_note(tmp_path):
    """A real set with no lesion masks (the Mexico OCT set): the randomisation check and the deletion test on real
    images make the note, worded as real, saying that where the map points is not scored."""
    from retina_core.audit.evidence import method_trust, trust_badge

    w = tmp_path / "weights"
    rep = {**_phantom_report(n=32, rho=0.27, pg=None), "metric_kind": "real",
           "data": "../shared/realdata/mexico_oct_dme",
           "evidence": {"tag": "mexico_oct_dme", "kind": "real", "set": "mexico_oct_dme",
                        "set_title": "Mexico OCT (DME)"}}
    _write(w / "evidence" / "m-abc-mexico_oct_dme.json", rep)
    note, warn = _note(w)
    assert not warn and note.startswith("gradcam passed the sanity check on this model")
    assert "deletion AUC 0.30 against 0.60" in note and "32 real images of Mexico OCT (DME)" in note
    assert "training images included" in note and "not scored" in note and "phantom" not in note
    badge = trust_badge(method_trust("m", "abc", weights_dir=w)["gradcam"])
    assert badge == "sanity check passed on real images (|rho| 0.27)"
    # a phantom report for the same weights comes first for the top-level figures (it scores the pointing game)
    _write(w / "evidence" / "m-abc-phantoms.json", _phantom_report(n=40, rho=0.2, pg=0.9))
    assert "measured on synthetic phantoms only" in _note(w)[0]


@pytest.mark.parametrize("kind, figures, words", [
    ("chance", dict(pg=0.21, chance=0.24, p=0.75, target="diabetic_retinopathy"),
     "**is no better than chance at finding real lesions**"),
    ("not shown", dict(pg=0.48, p=0.09), "**is not shown to find real lesions better than chance**"),
    ("unfaithful", dict(drop=0.1, drop_rand=0.2), "**is no more faithful than chance on real photographs**"),
    ("frame", dict(outside=0.74), "**marks the frame more than the retina**"),
    ("randomisation", dict(rho=0.7), "**failed the sanity check**"),
])
def test_real_evidence_warnings_stay_warnings(tmp_path, kind, figures, words):
    w = tmp_path / "weights"
    _write(w / "evidence" / "m-abc-idrid_lesions.json", _real_report(**figures))
    note, warn = _note(w)
    assert warn and words in note and "real IDRiD photographs" in note and "phantom" not in note
    if kind == "chance":
        assert "(maps of 'diabetic_retinopathy')" in note and "P(diabetic_retinopathy)" in note
    if kind == "frame":
        assert "74% of its map lies outside the field of view" in note


def test_evidence_of_other_weights_is_ignored(tmp_path):
    from retina_core.audit.evidence import evidence_reports, method_trust

    w = tmp_path / "weights"
    _write(w / "evidence" / "m-old-idrid_lesions.json", _real_report(sha="old"))
    _write(w / "evidence" / "m-abc-phantoms.json", _phantom_report())
    _write(w / "evidence" / "other-abc-phantoms.json", {**_phantom_report(), "model": "other"})
    ev = method_trust("m", "abc", weights_dir=w)
    assert ev["gradcam"]["real"] is None and ev["gradcam"]["source"] == "m-abc-phantoms.json"
    assert "real" not in _note(w)[0].split("measured")[0]
    assert method_trust("m", "new", weights_dir=w) == {}
    assert "not evaluated" in _note(w, sha="new")[0]
    # without a sha: the weights the manifest of that folder lists
    _write(w / "manifest.json", {"m": {"file": "m.safetensors", "sha256": "old"}})
    assert [p.name for p, _ in evidence_reports("m", weights_dir=w)] == ["m-old-idrid_lesions.json"]


def test_the_bundled_evidence_is_read_from_weights(tmp_path):
    """The bundled DR grader has real IDRiD evidence (quoted first) and phantom evidence; the real 4-class head's
    DR maps are no better than chance on IDRiD: a warning. Read only (nothing is written into weights/)."""
    from retina_core.models.loading import read_manifest
    from retina_core.audit.evidence import method_trust, trust_note

    manifest = read_manifest()
    for name in ("fundus_dr_effnet_b0", "fundus_resnet18_head"):
        if name not in manifest:
            pytest.skip(f"no bundled {name}")
    ev = method_trust("fundus_dr_effnet_b0", manifest["fundus_dr_effnet_b0"]["sha256"])["gradcam"]
    assert ev["real"]["set"] == "idrid_lesions" and ev["kind"] == "phantom"
    note, warn = trust_note(ev, "gradcam")
    assert not warn and note.startswith("gradcam on 10 real IDRiD photographs") and "on synthetic phantoms" in note
    head = method_trust("fundus_resnet18_head", manifest["fundus_resnet18_head"]["sha256"])["gradcam"]
    note, warn = trust_note(head, "gradcam", label="glaucoma")
    assert warn and "no better than chance at finding real lesions" in note


def test_evidence_tag_merge_and_refusal(tmp_path):
    from retina_core.audit.evaluate import evidence_record, evidence_tag, merge_evidence, write_evidence

    assert evidence_tag({"data": "/somewhere/idrid_lesions", "metric_kind": "real_lesions"})[:2] == \
        ("idrid_lesions", "real")
    assert evidence_tag({"data": "/tmp/dr93", "metric_kind": "phantom"})[:2] == ("phantoms", "phantom")
    rec = evidence_record(_real_report())
    assert "images" not in rec["methods"]["gradcam"]["real_lesions"]           # per-image rows dropped
    assert rec["methods"]["gradcam"]["real_lesions"]["deletion_drop"] == 0.59
    big = evidence_record(_phantom_report(n=240))
    small = evidence_record({**_phantom_report(n=16), "methods": {
        "gradcam": {"randomisation_abs_spearman": 0.9, "n_images": 16}, "layercam": {"n_images": 16}}})
    merged = merge_evidence(big, small)
    assert merged["methods"]["gradcam"]["n_images"] == 240 and "layercam" in merged["methods"]
    assert merged["n_images"] == 240 and len(merged["evidence"]["runs"]) == 2
    # weights the folder's manifest does not list: nothing written
    assert write_evidence(_phantom_report(), tmp_path) is None and not (tmp_path / "evidence").exists()


def test_explain_eval_keeps_its_report_as_evidence_with_the_weights(tmp_path, capsys, monkeypatch):
    """A tiny phantom run (2 images) on weights in a temporary folder: its report is kept in that folder's
    evidence/ and the note quotes it; --no-evidence leaves the folder alone."""
    import json

    from retina_core.audit import evaluate
    from retina_core.cli import main
    from retina_core.phantoms import write_dataset
    from retina_core.audit.evidence import method_trust, trust_note
    from retina_core.testing import write_test_weights

    w = write_test_weights(tmp_path / "w", ["oct_resnet18"])
    sha = json.loads((w / "manifest.json").read_text())["oct_resnet18"]["sha256"]
    write_dataset("oct-kermany", 4, 0, tmp_path / "oct", size=96)
    args = ["explain-eval", "--model", "oct_resnet18", "--data", str(tmp_path / "oct"), "--weights-dir", str(w),
            "--methods", "gradcam", "--n", "2", "--steps", "2", "--stability", "", "--json"]
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    path = w / "evidence" / f"oct_resnet18-{sha[:12]}-phantoms.json"
    assert rep["evidence_written_to"] == str(path) and path.is_file()
    kept = json.loads(path.read_text())
    assert kept["weights_sha256"] == sha and kept["evidence"]["kind"] == "phantom"
    assert kept["methods"]["gradcam"]["randomisation_abs_spearman"] == \
        rep["methods"]["gradcam"]["randomisation_abs_spearman"]
    ev = method_trust("oct_resnet18", weights_dir=w)["gradcam"]
    assert ev["source"] == path.name and ev["n_images"] == 2
    note = trust_note(ev, "gradcam")[0]
    assert path.name in note and "measured on synthetic phantoms only" in note
    # --no-evidence (the same report again, without re-running it): the kept file is not touched
    before = path.read_text()
    again = {**{k: v for k, v in rep.items() if k != "evidence_written_to"}, "n_images": 99}
    monkeypatch.setattr(evaluate, "explain_eval", lambda *a, **k: again)
    assert main(args + ["--no-evidence"]) == 0
    assert "evidence_written_to" not in json.loads(capsys.readouterr().out) and path.read_text() == before


# ------------------------------------------------------------------------------ method_trust and the notes
def _evidence(weights_dir, name, report):
    """An explain-eval evidence file in `weights_dir`/evidence (where explain-eval keeps it)."""
    import json

    (weights_dir / "evidence").mkdir(parents=True, exist_ok=True)
    (weights_dir / "evidence" / name).write_text(json.dumps(report))
    return weights_dir / "evidence" / name


def test_method_trust_keeps_each_method_from_its_largest_report(tmp_path):
    """A smaller evidence file of many methods adds the methods it measured; it does not replace the figures of a
    larger one of the default method, nor the counterfactual (model-level) evidence that one has. File times never
    decide."""
    import os

    from retina_core.audit.evidence import method_trust

    big = {"model": "m", "weights_sha256": "abc", "n_images": 240,
           "methods": {"gradcam": {"randomisation_abs_spearman": 0.04, "pointing_game": 0.81}},
           "counterfactual": {"per_class": {}, "faithful_alone": {"n": 3}}}
    small = {"model": "m", "weights_sha256": "abc", "n_images": 48,
             "methods": {"gradcam": {"randomisation_abs_spearman": 0.1, "pointing_game": 0.7},
                         "layercam": {"randomisation_abs_spearman": 0.6, "pointing_game": 0.75}}}
    _evidence(tmp_path, "big.json", big)
    _evidence(tmp_path, "small.json", small)
    os.utime(tmp_path / "evidence" / "big.json", (1, 1))                  # the big report is the older one
    ev = method_trust("m", "abc", weights_dir=tmp_path)
    assert ev["gradcam"]["pointing_game"] == 0.81 and ev["gradcam"]["source"] == "big.json"
    assert ev["layercam"]["pointing_game"] == 0.75 and ev["layercam"]["source"] == "small.json"
    assert not ev["layercam"]["passes_randomisation"]
    # the counterfactual's per-input faithfulness was measured with Grad-CAM maps: it goes with gradcam only
    assert ev["gradcam"]["faithful_alone"] == {"n": 3} and ev["layercam"]["faithful_alone"] is None
    # as many images but no counterfactual phantoms: the fuller report keeps gradcam (whatever the file times)
    _evidence(tmp_path, "same_size.json", {**small, "n_images": 240})
    assert method_trust("m", "abc", weights_dir=tmp_path)["gradcam"]["source"] == "big.json"
    _evidence(tmp_path, "again.json", big)          # as full: the file name breaks the tie, not which is newer
    assert method_trust("m", "abc", weights_dir=tmp_path)["gradcam"]["source"] == "again.json"
    os.utime(tmp_path / "evidence" / "again.json", (1, 1))
    os.utime(tmp_path / "evidence" / "big.json", (10 ** 9, 10 ** 9))
    assert method_trust("m", "abc", weights_dir=tmp_path)["gradcam"]["source"] == "again.json"


def test_method_trust_reads_the_evidence_of_these_weights(tmp_path):
    from retina_core.audit.evidence import method_trust, trust_note

    report = {"model": "m", "weights_sha256": "abc", "n_images": 10,
              "methods": {"gradcam": {"randomisation_abs_spearman": 0.3, "pointing_game": 0.9},
                          "layercam": {"randomisation_abs_spearman": 0.7, "pointing_game": 0.8}}}
    _evidence(tmp_path, "explain_eval_m.json", report)
    _evidence(tmp_path, "other_weights.json", {**report, "weights_sha256": "old", "methods": {
        "gradcam": {"randomisation_abs_spearman": 0.9}}})
    ev = method_trust("m", "abc", weights_dir=tmp_path)
    assert ev["gradcam"]["passes_randomisation"] and not ev["layercam"]["passes_randomisation"]
    assert ev["gradcam"]["source"] == "explain_eval_m.json"
    ok, warn_ok = trust_note(ev["gradcam"], "gradcam")
    bad, warn_bad = trust_note(ev["layercam"], "layercam")
    assert not warn_ok and "passed the sanity check" in ok and "90%" in ok
    assert warn_bad and "failed the sanity check" in bad and "0.70" in bad
    assert method_trust("m", "unknown", weights_dir=tmp_path) == {}
    assert "not evaluated" in trust_note(None, "scorecam")[0]
    coarse, warn_coarse = trust_note({**ev["gradcam"], "pointing_game": 0.25}, "gradcam")
    assert warn_coarse and "rarely points at a lesion" in coarse and "25%" in coarse and "0.30" in coarse
    from retina_core.audit.common import passes_randomisation

    empty = {"randomisation_abs_spearman": 0.02, "randomisation_empty_fraction": 0.9}   # rho 0 by convention
    assert passes_randomisation(empty) is None and passes_randomisation({**empty, "randomisation_empty_fraction": 0.1})
    vague, warn_vague = trust_note({**empty, "passes_randomisation": None, "pointing_game": 0.9, "source": "x",
                                    "n_images": 3}, "gradcam")
    assert not warn_vague and "inconclusive" in vague and "passed" not in vague
    # a good overall figure can hide a class the map misses: the note warns for that suggested class only
    by_class = {**ev["gradcam"], "pointing_game_by_label": {"Mild": 0.2, "Severe": 1.0},
                "n_lesion_images_by_label": {"Mild": 5, "Severe": 5}}
    mild, warn_mild = trust_note(by_class, "gradcam", "Mild")
    assert warn_mild and "rarely points at the lesions of 'Mild'" in mild and "20%" in mild and "90%" in mild
    assert not trust_note(by_class, "gradcam", "Severe")[1] and not trust_note(by_class, "gradcam")[1]
    few = {**by_class, "n_lesion_images_by_label": {"Mild": 2}}
    assert not trust_note(few, "gradcam", "Mild")[1]                       # 2 images are too few to warn on
    from retina_core.audit.evidence import trust_badge

    assert trust_badge(ev["gradcam"]).startswith("sanity check passed")
    assert trust_badge(ev["layercam"]).startswith("FAILED") and trust_badge(None) == "not evaluated"
    # weights trained with lesion masks: the note says their maps were taught where lesions are
    assert ev["gradcam"]["lesion_guided"] is False and "lesion masks" not in ok
    guided = trust_note({**ev["gradcam"], "lesion_guided": True}, "gradcam")[0]
    assert "trained with lesion masks" in guided and "90%" in guided
    assert "trained with lesion masks" in trust_note({**ev["gradcam"], "lesion_guided": True, "pointing_game": 0.25},
                                                     "gradcam")[0]
    from retina_core.models.loading import read_manifest
    entry = read_manifest()["fundus_dr_effnet_b0"]          # the bundled grader was trained with guidance
    bundled = method_trust("fundus_dr_effnet_b0", entry["sha256"])
    assert bundled and bundled["gradcam"]["lesion_guided"] is True
    # faithfulness against a random map: a map that deletes no faster than chance is a warning whatever it points at
    sharp = {**ev["gradcam"], "deletion_auc": 0.72, "deletion_auc_random_map": 0.67, "faithful_vs_random": False}
    note, warn = trust_note(sharp, "gradcam")
    assert warn and "no more faithful than chance" in note and "0.72 against 0.67" in note
    note, warn = trust_note({**sharp, "deletion_auc": 0.23, "deletion_auc_random_map": 0.74,
                             "faithful_vs_random": True}, "gradcam")
    assert not warn and "faster than removing random regions (deletion AUC 0.23 against 0.74)" in note
    coarse, warn = trust_note({**sharp, "pointing_game": 0.42, "faithful_vs_random": True, "deletion_auc": 0.41,
                               "deletion_auc_random_map": 0.80}, "gradcam")
    assert warn and "rarely points at a lesion" in coarse and "(deletion AUC 0.41 against 0.80)" in coarse


def test_trust_note_names_the_lesions_a_counterfactual_showed_the_model_ignores(tmp_path):
    from retina_core.audit.evidence import method_trust, trust_note, unused_lesions

    def cls(n, drop, drop0, swell0=None, pg=0.0):
        out = {"n": n, "pointing_game": pg, "original": {"n": n},
               "without_ellipsoids": {"n": n, "drop": drop, "drop_no_record": drop0}}
        out["without_thickening"] = None if swell0 is None else {"n": n, "drop": 0.1, "drop_no_record": swell0}
        return out

    cf = {"per_class": {"DR": cls(18, 0.001, -0.002, 0.11), "DME": cls(13, 0.0, 0.01, 0.63, pg=0.53),
                        "MH": cls(23, 0.0, 0.30),           # used without the record: not listed
                        "CNV": cls(30, 0.0, 0.0, pg=1.0),   # cysts unused, but the map finds the CNV: not listed
                        "CSR": cls(2, 0.0, 0.0),            # too few eyes to say
                        "AMD": {"n": 15, "without_ellipsoids": None}}}
    assert [u["class"] for u in unused_lesions(cf)] == ["DR", "DME"] and unused_lesions(None) == []
    report = {"model": "m", "weights_sha256": "abc", "n_images": 10, "counterfactual": cf,
              "methods": {"gradcam": {"randomisation_abs_spearman": 0.1, "pointing_game": 0.8}}}
    _evidence(tmp_path, "explain_eval_m.json", report)
    ev = method_trust("m", "abc", weights_dir=tmp_path)["gradcam"]
    note, warn = trust_note(ev, "gradcam")
    assert not warn and "on DR (18, pointing game 0.00) and DME (13, pointing game 0.53) eyes" in note
    assert "does not use those lesions" in note
    assert "DR 0.11, DME 0.63" in note and "MH" not in note
    # a cue the model falls back on: with the swelling gone too, leaving the lesions out lowers P
    backup = [{**u, "lesion_drop_without_swelling": 0.2 if u["class"] == "DME" else 0.0} for u in ev["unused_lesions"]]
    fallback = trust_note({**ev, "unused_lesions": backup}, "gradcam")[0]
    assert ("on DME eyes this model does not need them while the swelling is there (with the swelling also left out, "
            "leaving them out lowers the probability by 0.20); on DR eyes it does not use them") in fallback
    plain = trust_note({**ev, "unused_lesions": []}, "gradcam")[0]
    assert "Counterfactual" not in plain


def test_trust_note_reports_what_leaving_the_suggested_class_lesions_out_did(tmp_path):
    """2-D counterfactual phantoms (masked lesions left out; no clinical record): the note under a suggestion says
    how P(suggested class) moved on phantoms of that class, with a verdict that follows the figures."""
    from retina_core.audit.evidence import lesion_reliance_by_class, method_trust, trust_note, unused_lesions

    def cls(n, p, p_without, called_without, p_healthy, pg=1.0):
        return {"n": n, "pointing_game": pg, "original": {"n": n, "p_disease": p, "called": n},
                "without_masked": {"n": n, "p_disease": p_without, "called": called_without, "drop": p - p_without,
                                   "p_healthy": p_healthy}}

    cf = {"modality": "fundus", "healthy_class": "No DR", "variants": ["original", "without_masked"],
          "per_class": {"Moderate": cls(12, 0.84, 0.0, 0, 0.98), "Severe": cls(12, 0.9, 0.7, 9, 0.1),
                        "Mild": cls(12, 0.6, 0.59, 12, 0.3, pg=0.4), "PDR": cls(2, 0.9, 0.0, 0, 0.9)}}
    assert [u["class"] for u in unused_lesions(cf)] == ["Mild"]     # the map misses and the lesions are unused
    report = {"model": "m2", "weights_sha256": "abc", "n_images": 10, "counterfactual": cf,
              "methods": {"gradcam": {"randomisation_abs_spearman": 0.1, "pointing_game": 0.9}}}
    _evidence(tmp_path, "explain_eval_m2.json", report)
    ev = method_trust("m2", "abc", weights_dir=tmp_path)["gradcam"]
    used = trust_note(ev, "gradcam", label="Moderate")[0]
    assert ("12 'Moderate' eyes re-rendered without the lesions their masks mark went from P(Moderate) 0.84 to 0.00 "
            "(0 still called 'Moderate', P(No DR) 0.98): the model uses those lesions.") in used
    assert "only in part" in trust_note(ev, "gradcam", label="Severe")[0]
    # OCT: the swelling left out too (every eye had some): said where the lesions explain only part of the call
    swell = {**cf["per_class"]["Severe"], "without_thickening": {"n": 12, "p_disease": 0.39, "called": 7}}
    ev2 = {**ev, "lesion_reliance": lesion_reliance_by_class({**cf, "per_class": {"Severe": swell}})}
    assert ("only in part (without the retinal swelling around them, which no mask marks, P(Severe) was 0.39)"
            in trust_note(ev2, "gradcam", label="Severe")[0])
    assert "the model does not use those lesions" in trust_note(ev, "gradcam", label="Mild")[0]
    assert "Counterfactual phantoms:" not in trust_note(ev, "gradcam", label="PDR")[0]      # 2 eyes: too few
    assert "Counterfactual phantoms:" not in trust_note(ev, "gradcam")[0]                   # no suggestion named
