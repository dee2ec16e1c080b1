"""The CLI as a user runs it: models, predict (JSON and heatmap files), clear errors for bad input."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from retina_core.cli import main


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
    assert [r["model"] for r in recs] == ["fundus_dr_effnet_b0", "oct_resnet18"]
    for r in recs:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-6 and r["label"] in r["probabilities"]
        heat = np.asarray(Image.open(r["heatmap"]))
        src = np.asarray(Image.open(r["file"]))
        assert heat.shape[:2] == src.shape[:2]
        assert fundus_png.stem not in r["heatmap"]   # outputs are named by content hash only


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
