"""`python -m retina_core clinic status | upgrade | export` on a temporary SQLite clinic, and demo mode."""
import datetime as dt
import json

from retina_core.cli import main
from retina_core.clinic import db, load_config, open_clinic, records
from retina_core.clinic.testing import synthetic_analysis, synthetic_image


def test_clinic_cli_upgrade_status_and_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETINA_DATA_DIR", str(tmp_path / "var"))
    for k in ("RETINA_DATABASE_URL", "RETINA_MODE", "RETINA_SITE_SECRET"):
        monkeypatch.delenv(k, raising=False)
    url = load_config().database_url
    db.upgrade(url, "0001_initial")                          # an older database: `upgrade` brings it to head
    assert main(["clinic", "upgrade", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"database": url, "from": "0001_initial", "to": db.HEAD}

    clinic = open_clinic()
    img = synthetic_image(7)
    saved = records.save_reading(clinic, case_ref="CLI-0001", eye="OS", visit_date=dt.date(2026, 5, 1), image=img,
                                 analyses=[synthetic_analysis(img, {"CNV": 0.2, "NORMAL": 0.8})], actor="dr-cli")
    records.save_review(clinic, saved.analysis_ids[0], "agree", reviewer="dr-cli", sign=True)
    clinic.dispose()

    assert main(["clinic", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["mode"], status["revision"], status["cases"], status["signed_reviews"]) == ("dev", db.HEAD, 1, 1)
    assert main(["clinic", "export", "--out", str(tmp_path / "out"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"] == {"oct_resnet18": {"NORMAL": 1}} and out["images"] == 1
    labels = (tmp_path / "out" / "oct_resnet18" / "labels.csv").read_text().splitlines()
    assert labels[0] == "file,label,patient_id,eye,modality,model_label,decision" and ",NORMAL,case-1,OS," in labels[1]


def test_demo_mode_has_no_database(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETINA_MODE", "demo")
    monkeypatch.setenv("RETINA_DATA_DIR", str(tmp_path / "var"))
    assert main(["clinic", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "demo"
    assert main(["clinic", "upgrade"]) == 2                  # a clear error, no database made
    assert "Demo mode" in capsys.readouterr().err and not (tmp_path / "var").exists()
