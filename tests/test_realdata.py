"""The real public sets of ../shared/realdata: loading, patient-level splits, true pairs, provenance, intervals, and
one prediction per installed real-data model. Images are read in place; nothing derived from them is written to
the repository (pairs.csv and split hashes go to tmp_path)."""
import csv
import json

import numpy as np
import pytest

from retina_core.evaluate.metrics import bootstrap_ci, classification_metrics
from retina_core.io.datasets import load_dataset, patient_split, record_lesion_masks, write_pairs
from retina_core.io.realsets import REAL_SETS, real_set_of, split_hashes
from retina_core.models.loading import trained_on


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("name", ["mexico_fundus_dme_dr", "mexico_oct_dme", "eye_disease_4class"])
def test_labelled_sets_load_as_they_lie(realdata, name):
    idx = load_dataset(realdata / name)
    rows = _rows(realdata / name / "labels.csv")
    assert idx.layout == "labels" and len(idx.records) == len(rows)
    assert sorted(idx.classes) == sorted({r["label"] for r in rows})
    # Mexico: the patient_id column; 4-class: the number of <number>_left/_right names (other names: one patient each)
    assert all(r.patient_id for r in idx.records if r.path.stem.endswith(("_left", "_right")) or "mexico" in name)
    assert {r.eye for r in idx.records} <= {"OD", "OS", None}
    if name.startswith("mexico"):
        assert idx.classes == ["noDME", "DME"] and all(r.eye for r in idx.records)
        assert {r.meta["dr_grade"] for r in idx.records} >= {0, "NPDR", "PDR", "unknown"}
    assert real_set_of(realdata / name)["name"] == name


def test_patient_level_split_keeps_each_patient_in_one_split(realdata):
    idx = load_dataset(realdata / "eye_disease_4class")
    parts = patient_split(idx.records, fractions=(0.7, 0.15, 0.15), seed=0)
    where = {}
    for split, recs in parts.items():
        for r in recs:
            assert where.setdefault(r.patient_id or str(r.path), split) == split
    assert sum(len(v) for v in parts.values()) == len(idx.records)
    for split in ("train", "val", "test"):   # stratified: every class in every split, near its share
        counts = {c: sum(r.label == c for r in parts[split]) for c in idx.classes}
        assert min(counts.values()) > 0.15 * len(parts[split])
    again = patient_split(idx.records, fractions=(0.7, 0.15, 0.15), seed=0)
    assert [str(r.path) for r in again["test"]] == [str(r.path) for r in parts["test"]]   # seeded


def test_split_hashes_name_the_exact_files_without_their_names(realdata, tmp_path):
    idx = load_dataset(realdata / "mexico_oct_dme")
    parts = patient_split(idx.records[:40], seed=0)
    summary, lists = split_hashes(parts)
    assert {k: v["n"] for k, v in summary.items()} == {k: len(v) for k, v in parts.items()}
    text = json.dumps(lists)
    assert not any(r.path.stem in text for r in idx.records[:40])       # content hashes, never file names
    moved = dict(parts, test=parts["test"][1:])
    assert split_hashes(moved)[0]["test"]["sha256"] != summary["test"]["sha256"]


def test_true_pairs_join_the_two_mexico_sets_by_patient_and_eye(realdata, tmp_path):
    info = write_pairs(realdata / "mexico_fundus_dme_dr", realdata / "mexico_oct_dme", tmp_path)
    assert info["eyes"] > 250 and info["pairs"] >= info["eyes"]
    idx = load_dataset(tmp_path)
    assert idx.layout == "paired" and set(idx.classes) == {"DME", "noDME"}
    for r in idx.records[:50]:
        f, o = r.path.stem.split("_"), r.meta["oct"].rsplit("/", 1)[-1].split("_")
        assert f[0] == o[0] == r.patient_id and f[1] == o[1]    # <patient>_<OD|OI>_f_n / _o_n: same eye
    assert real_set_of(tmp_path)["name"] == "mexico_fundus_dme_dr + mexico_oct_dme"


def test_dr_grade_column_gives_a_fully_graded_dr_set(realdata):
    """The Mexico fundus set's dr_grade column as labels: only the graded photographs, none vs any DR."""
    rows = _rows(realdata / "mexico_fundus_dme_dr" / "labels.csv")
    idx = load_dataset(realdata / "mexico_fundus_dme_dr", label_column="dr_grade", label_map="0=noDR,NPDR=DR,PDR=DR")
    graded = [r for r in rows if r["dr_grade"] != "unknown"]
    assert idx.classes == ["noDR", "DR"] and len(idx.records) == len(graded)
    assert sum(r.label == "DR" for r in idx.records) == sum(r["dr_grade"] in ("NPDR", "PDR") for r in graded)
    assert all(r.patient_id and r.meta["label_from"].startswith("dr_grade=") for r in idx.records)
    assert "left out" in idx.warnings[-1]


def test_lesion_set_carries_its_masks(realdata):
    idx = load_dataset(realdata / "idrid_lesions")
    assert len(idx.records) == 10 and idx.classes == ["lesions"]
    masks = record_lesion_masks(idx.records[0], shape=(142, 214))
    assert {"MA", "HE", "EX", "OD"} <= set(masks) and all(m.shape == (142, 214) for m in masks.values())
    assert 0 < masks["OD"].mean() < 0.1


def test_bootstrap_interval_brackets_the_estimate_and_widens_with_groups():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.35 + rng.random(200) * 0.65, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    point = classification_metrics(y, probs, ["noDME", "DME"])
    ci = bootstrap_ci(y, probs, ["noDME", "DME"], n_boot=300)
    assert ci["auc_macro"][0] < point["auc_macro"] < ci["auc_macro"][1]
    assert ci["accuracy"][0] < point["accuracy"] < ci["accuracy"][1]
    grouped = bootstrap_ci(y, probs, ["noDME", "DME"], n_boot=300, groups=np.arange(200) // 10)
    assert grouped["resampled"] == "patients"
    assert grouped["auc_macro"][1] - grouped["auc_macro"][0] > 0


def test_trained_on_says_real_or_phantoms():
    real = {"real_data": {"name": "mexico_oct_dme", "title": REAL_SETS["mexico_oct_dme"]["title"]},
            "splits": {"train": 536}, "heldout_metrics": {"n": 180, "auc_macro": 0.9312},
            "heldout_ci95": {"auc_macro": [0.88, 0.97]}}
    assert trained_on(real) == ("real: Mexico OCT (DME), 536 training images; held-out AUC 0.93 "
                                "(95% CI 0.88-0.97), n = 180")
    assert trained_on({"trained_on_phantoms": True}).startswith("synthetic phantoms only")
    # checks on other sets (scripts/external_dr_check.py --record): the ones that failed are said with their figure
    held = {"check": "DR on set B", "figure": "AUC 0.91 (95% CI 0.85-0.95), n = 90", "holds": True}
    failed = {"check": "DR vs no DR on another clinic's photographs", "figure": "AUC 0.27 (95% CI 0.18-0.37), n = 398",
              "holds": False}
    real = {**real, "sha256": "ab" * 32}
    held, failed = ({**c, "weights_sha256": "ab" * 6} for c in (held, failed))
    assert trained_on({**real, "external_checks": [held]}) == trained_on(real)
    assert trained_on({**real, "external_checks": [{**failed, "weights_sha256": "cd" * 6}]}) == trained_on(real)
    said = trained_on({**real, "external_checks": [held, failed]})
    assert said.startswith(trained_on(real) + ". Did not hold outside its training set: DR vs no DR on another "
                           "clinic's photographs, AUC 0.27 (95% CI 0.18-0.37), n = 398.") and "set B" not in said


def test_bundled_4class_reading_says_where_its_dr_answer_failed():
    """The bundled 4-class weights carry the external DR check (scripts/external_dr_check.py --record): every
    reading of them says so next to what they were trained on, the way the app, reports and predict --json do."""
    from retina_core.models import read_manifest
    from retina_core.models.loading import OUTSIDE_CAUTION

    entry = read_manifest().get("fundus_resnet18_head")
    if not entry or not entry.get("real_data"):
        pytest.skip("no real-data fundus_resnet18_head weights installed in weights/")
    checks = entry.get("external_checks") or []
    assert any(not c["holds"] and "Mexico" in c["check"] for c in checks)
    assert all(c["weights_sha256"] == entry["sha256"][:12] for c in checks)   # made on these very weights
    assert OUTSIDE_CAUTION in trained_on(entry) and "Mexico" in trained_on(entry)


def test_bundled_real_models_quote_a_confident_level_chosen_on_validation():
    """`python -m retina_core confidence --record` on each bundled real-data model: a level chosen on the validation
    split, measured on the same test split as the manifest's held-out figures, for these very weights."""
    from retina_core.models import read_manifest
    from retina_core.models.loading import confidence_note, confidence_of

    real = {n: e for n, e in read_manifest().items() if e.get("real_data")}
    if not real:
        pytest.skip("no real-data weights installed in weights/")
    for name, entry in real.items():
        rec = confidence_of(entry)
        assert rec and rec["chosen_on"] == "val", name
        assert rec["val"]["accuracy_confident"] >= rec["target_accuracy"], name
        assert rec["test"]["n"] == entry["heldout_metrics"]["n"] == entry["splits"]["test"], name
        assert "test split" in confidence_note(entry, 0.999)


def test_each_installed_real_data_model_reads_a_real_image_of_its_set(realdata):
    import retina_core as rc
    from retina_core.models import read_manifest

    real = {n: e for n, e in read_manifest().items() if e.get("real_data")}
    if not real:
        pytest.skip("no real-data weights installed in weights/")
    for name, entry in real.items():
        set_name = entry["real_data"]["name"].split(" + ")[0]
        for rec in load_dataset(realdata / set_name).records[:20]:   # the first that the gate passes
            a = rc.analyze(rc.read_image(rec.path), name)
            if a.has_result:
                break
        assert list(a.probabilities) == entry["classes"], name
        assert a.trained_on.startswith("real: ") and a.heatmap is not None


def test_confound_check_finds_the_fundus_camera_shortcut(realdata):
    """The shortcut that kept the fundus DME model out of the bundle: the field's share of the frame alone separates
    the Mexico DME photographs (docs/real_data.md)."""
    from retina_core.evaluate.confounds import acquisition_confounds

    rep = acquisition_confounds(realdata / "mexico_fundus_dme_dr", "DME", split="test", fractions="0.6,0.2,0.2",
                                split_by="patient_hash")
    assert rep["n"] == 241 and rep["modality"] == "fundus"
    assert rep["statistics"]["field-of-view share"]["auc"] > 0.95
    assert not rep["statistics"]["field-of-view share"]["higher_in_positive"]
