"""The quality and modality gate on real images, and the `gate-eval` command that measures it.

Real images are read in place from ../shared/realdata (or $RETINA_REALDATA); those tests skip when it is absent.
Nothing here writes an image made from them except into pytest's temporary folder.
Run: .venv/bin/python -m pytest -q tests/test_gate_real.py
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from retina_core.cli import main
from retina_core.evaluate.gate import (evaluate_set, guess_expected, half_of, read_rows, realdata_root,
                                       reason_group)
from retina_core.io.decode import read_image
from retina_core.quality import GRADABLE, UNGRADABLE, assess_quality

ROOT = realdata_root()
SETS = {"mexico_fundus_dme_dr": "fundus", "mexico_oct_dme": "oct", "eye_disease_4class": "fundus",
        "idrid_lesions": "fundus"}
real = pytest.mark.skipif(not ROOT.is_dir(), reason=f"real data not found at {ROOT} (set RETINA_REALDATA)")


def real_set(name: str):
    if not (ROOT / name / "labels.csv").is_file():
        pytest.skip(f"real set {name} not found under {ROOT}")
    return ROOT / name


@real
@pytest.mark.parametrize("name", SETS)
def test_modality_right_on_a_sample_of_each_set(name):
    r = evaluate_set(real_set(name), limit=12)  # 12 images evenly spaced over labels.csv (every class)
    assert r["expected"] == SETS[name] and r["n"] == min(12, len(read_rows(ROOT / name)))
    assert r["modality_correct"] == r["n"], r["wrong_modality_files"]
    assert r["gradable"] >= 0.75 * r["n"], r["refused_files"]


@real
@pytest.mark.parametrize("name, file", [
    ("idrid_lesions", "images/IDRiD_01.jpg"),
    ("mexico_oct_dme", "noDME/1222_OD_o_2.jpg"),
    # dark and shadowed, yet disc, vessels and exudates show once brightened: called "not retinal" or "too dark"
    # before the gate was re-fitted on real photographs
    ("mexico_fundus_dme_dr", "DME/0186_OI_f_1.jpg"),
    ("mexico_fundus_dme_dr", "DME/0851_OD_f_1.jpg"),
    # a square-resized photograph (elliptic field) and one cropped top and bottom by the frame
    ("eye_disease_4class", "glaucoma/_325_5401809.jpg"),
    ("eye_disease_4class", "diabetic_retinopathy/11221_right.jpeg"),
])
def test_real_photographs_and_scans_a_grader_reads_are_gradable(name, file):
    q = assess_quality(read_image(real_set(name) / file))
    assert q.modality == SETS[name] and q.verdict == GRADABLE, (q.reasons, q.features)


@real
@pytest.mark.parametrize("name, file, words", [
    ("mexico_fundus_dme_dr", "DME/0022_OI_f_1.jpg", "too dark"),        # brightened, only JPEG noise shows
    ("eye_disease_4class", "cataract/2123_left.jpg", "blurred"),        # dense cataract haze, no vessel visible
    ("mexico_oct_dme", "DME/1997_OD_o_4.jpg", "weak"),                  # barely any signal above the speckle
])
def test_real_ungradable_images_are_refused_with_their_reason(name, file, words):
    q = assess_quality(read_image(real_set(name) / file))
    assert q.modality == SETS[name] and q.verdict == UNGRADABLE, (q.reasons, q.features)
    assert any(words in r for r in q.reasons), q.reasons


@real
def test_gate_eval_json_reports_every_field(capsys):
    rc = main(["gate-eval", str(real_set("idrid_lesions")), str(real_set("mexico_oct_dme")), "--limit", "3",
               "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["set"] for r in rows] == ["idrid_lesions", "mexico_oct_dme"]
    for r, expected in zip(rows, ("fundus", "oct")):
        assert r["expected"] == expected and r["n"] == 3
        for key in ("modality_correct", "modality_pct", "gradable", "gradable_pct", "refusals_by_reason",
                    "refused_hazy_only", "refused_files", "wrong_modality_files", "halves"):
            assert key in r
        assert r["halves"]["fit"]["n"] + r["halves"]["heldout"]["n"] == 3
        assert r["modality_pct"] == pytest.approx(100.0 * r["modality_correct"] / 3, abs=0.05)


@real
def test_expected_modality_guessed_from_the_set_name():
    for name, modality in SETS.items():
        assert guess_expected(real_set(name), read_rows(ROOT / name)) == modality


def test_gate_eval_on_a_plain_folder_refusals_grouped_and_contact_sheet(tmp_path, capsys):
    """No real data needed: a walked folder with a noise picture and a black frame, both refused."""
    data = tmp_path / "some_fundus_folder"
    (data / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((120, 160, 3)) * 255).astype(np.uint8)).save(data / "sub" / "noise.png")
    Image.fromarray(np.zeros((120, 160, 3), np.uint8)).save(data / "black.png")
    sheet = tmp_path / "refused.png"
    assert main(["gate-eval", str(data), "--json", "--contact-sheet", str(sheet)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["expected"] == "fundus" and r["n"] == 2 and r["gradable"] == 0 and r["modality_correct"] == 0
    assert sorted(f["file"] for f in r["refused_files"]) == ["black.png", "sub/noise.png"]
    assert sum(r["refusals_by_reason"].values()) >= 2 and all(f["reasons"] for f in r["refused_files"])
    assert r["refused_hazy_only"] == 0 and not any(f["hazy"] for f in r["refused_files"])   # not retinal: not hazy
    assert sheet.is_file() and Image.open(sheet).size[0] > 100


@pytest.mark.parametrize("argv, words", [
    (["gate-eval", "/no/such/folder"], "not a folder"),
    (["gate-eval", "{tmp}", "--limit", "0"], "--limit"),
    (["gate-eval", "{tmp}"], "--expect"),            # a folder name that says nothing about its modality
])
def test_gate_eval_bad_input_is_one_line_error(tmp_path, capsys, argv, words):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err and "Traceback" not in err


def test_patient_halves_and_reason_groups():
    # both eyes of a patient fall in one half; ids with leading zeros are the same patient as without
    assert half_of({"file": "cataract/1234_left.jpg"}) == half_of({"file": "normal/1234_right.jpg"})
    assert half_of({"file": "x.jpg", "patient_id": "0736"}) == half_of({"file": "y.jpg", "patient_id": "0736"})
    halves = {half_of({"file": f"{i}_left.jpg"}) for i in range(40)}
    assert halves == {"fit", "heldout"}
    assert reason_group("image is blurred (focus score 0.21 < 0.29)") == "image is blurred"
    assert (reason_group("very low contrast (variation 0.030 < 0.05): haze, media opacity or wrong exposure")
            == "very low contrast: haze, media opacity or wrong exposure")


@real
def test_hazy_cataract_photographs_are_read_for_media_opacity_only():
    """Cataract clouds the view: the gate refuses many cataract photographs as blurred (in the 4-class set 201 of
    the 211 it refuses, for blur or low contrast alone). Retaking does not clear a cataract, so such a photograph is
    still read by a model with a cataract class, which shows only a cataract reading; any other answer is withheld.
    The upload page (analyze_all), `analyze` and batch screening agree."""
    from retina_core.analysis import HAZY_NOTE, analyze, analyze_all, get_model, reads_media_opacity
    from retina_core.batch import infer, prepare
    from retina_core.quality import hazy_only

    folder = real_set("eye_disease_4class") / "cataract"
    files = sorted(folder.iterdir())[:40]
    hazy = [f for f in files if hazy_only(assess_quality(read_image(f, max_side=1024)))][:3]
    assert hazy, "no hazy-only refusal among the first 40 cataract photographs"
    assert reads_media_opacity(get_model("fundus_resnet18_head"))
    for f in hazy:
        a = analyze(f)
        assert a.quality.verdict == UNGRADABLE and not a.quality.gradable
        if a.has_result:
            assert a.label == "cataract" and HAZY_NOTE in a.notes and "not gradable" in a.suggestion
        else:
            assert any("did not read it as media opacity" in n for n in a.notes)
        assert [x.label for x in analyze_all(f)] == [a.label]      # the DR-grade model (no cataract class) does not read it
        row = infer([prepare(str(f))], None)[0]
        assert row["label"] == (a.label or "no result") and row["quality"] == UNGRADABLE
    r = evaluate_set(folder.parent, limit=8)          # gate-eval counts them apart from the other refusals
    assert r["refused_hazy_only"] == sum(f["hazy"] for f in r["refused_files"]) <= r["refused"]
