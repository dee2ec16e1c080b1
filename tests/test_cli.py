"""The CLI as a user runs it: models, predict (JSON and heatmap files), clear errors for bad input."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from retina_core.analysis import DEFAULT_MODELS, PHANTOM_DEFAULTS, installed_models
from retina_core.cli import main
from retina_core.models import read_manifest


def test_models_lists_registry_with_weights(capsys):
    assert main(["models", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {r["name"]: r for r in rows}
    assert by_name["oct_resnet18"]["sha256"] and by_name["fundus_dr_effnet_b0"]["metric_kind"] == "phantom"


def test_predict_json_and_heatmaps(tmp_path, fundus_png, oct_png, capsys):
    out = tmp_path / "maps"
    assert main(["predict", str(fundus_png), str(oct_png), "--out", str(out), "--json"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in recs] == [str(fundus_png), str(oct_png)]
    assert [r["modality"] for r in recs] == ["fundus", "oct"]
    # the default model of each modality first (a real-data model where one is installed), then every other one
    assert [r["model"] for r in recs] == [DEFAULT_MODELS["fundus"], DEFAULT_MODELS["oct"]]
    manifest = read_manifest()
    for r in recs:
        found = [r, *r.get("other_suggestions", [])]
        assert [f["model"] for f in found] == installed_models(r["modality"])
        assert [bool(manifest[f["model"]].get("real_data")) for f in found] == \
            sorted((bool(manifest[f["model"]].get("real_data")) for f in found), reverse=True)
        for f in found:
            assert abs(sum(f["probabilities"].values()) - 1) < 1e-6 and f["label"] in f["probabilities"]
            assert f["trained_on"].startswith(("real: ", "synthetic phantoms only"))
            heat = np.asarray(Image.open(f["heatmap"]))
            src = np.asarray(Image.open(r["file"]))
            assert heat.shape[:2] == src.shape[:2]
            assert fundus_png.stem not in f["heatmap"]   # outputs are named by content hash only


def test_real_data_models_come_first_where_installed():
    manifest = read_manifest()
    for modality in ("fundus", "oct"):
        names = installed_models(modality)
        real = [n for n in names if manifest[n].get("real_data")]
        assert names[:len(real)] == real
        assert DEFAULT_MODELS[modality] == (real[0] if real else PHANTOM_DEFAULTS[modality])


def test_predict_reports_bad_files_and_continues(tmp_path, oct_png, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    assert main(["predict", str(bad), str(oct_png), "--json"]) == 1
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "error" in recs[0] and "Traceback" not in recs[0]["error"]
    assert recs[1]["label"] is not None


def test_module_entry_point_runs_as_a_user_would(oct_png):
    done = subprocess.run([sys.executable, "-m", "retina_core", "predict", str(oct_png)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "oct_resnet18" in done.stdout and "Traceback" not in done.stderr


def test_predict_reads_an_oct_volume_with_its_record_and_any_3d_method(tmp_path, capsys):
    import nibabel as nib

    from retina_core.phantoms import oct_volume

    ph = oct_volume("CNV", seed=21, n_slices=32, height=128, width=128)
    src = tmp_path / "Doe_Jane_1950_OD.nii.gz"                    # a name that must not reach any output
    nib.save(nib.Nifti1Image(ph.image, np.eye(4)), str(src))
    out = tmp_path / "maps"
    assert main(["predict", str(src), "--record", "age=71,sex=F,hba1c=6.1", "--method", "hirescam",
                 "--out", str(out), "--json"]) == 0
    (rec,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rec["modality"] == "oct_volume" and rec["model"] == "oct_volume_fusion3d_tiny"
    assert rec["method"] == "hirescam" and rec["label"] in ("normal", "disease") and 0 <= rec["p_disease"] <= 1
    used = rec["record_used"]
    assert used["age"] == 71 and used["sex"] == "F" and used["cst_um"] is None
    assert used["eye"] == "OD"                                    # laterality from the file name
    maps = np.load(rec["heatmap"])
    assert maps.shape == ph.image.shape and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1
    assert rec["peak_slice"] == int(np.argmax(maps.sum(axis=(1, 2))))
    assert ph.masks["cnv"][rec["peak_slice"]].any()               # the strongest B-scan holds the CNV
    for f in (rec["heatmap"], rec["overlay"], rec["en_face_overlay"]):
        assert "Doe" not in f and "1950" not in f
    # bad input: a clear message and a non-zero exit, never a traceback
    assert main(["predict", str(src), "--method", "vit_relevance"]) == 1
    assert "does not apply to OCT volumes" in capsys.readouterr().out
    assert main(["predict", str(src), "--model", "oct_resnet18"]) == 1
    assert "reads single images" in capsys.readouterr().out
    assert main(["predict", str(src), "--record", "weight=80"]) == 2
    assert "unknown" in capsys.readouterr().err
