"""Selective prediction: the confident level chosen on validation, measured on test, quoted by every reading."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from retina_core.cli import main
from retina_core.evaluate.selective import band_accuracy, fit_threshold, risk_coverage, top_confidence
from retina_core.models import create_model, load_model
from retina_core.models.loading import (LOW_CONFIDENCE, confidence_note, confidence_of, confidence_threshold,
                                        sha256_file)
from retina_core.phantoms import write_dataset


def _probs(conf: list[float], pred: list[int], n_cls: int = 3) -> np.ndarray:
    """Rows whose top class is `pred` with probability `conf` (the rest shared equally)."""
    p = np.zeros((len(conf), n_cls))
    for i, (c, k) in enumerate(zip(conf, pred)):
        p[i] = (1 - c) / (n_cls - 1)
        p[i, k] = c
    return p


def test_fit_threshold_keeps_the_most_readings_that_reach_the_target():
    # ten readings, most confident first: right, right, right, wrong, right, right, wrong, wrong, wrong, wrong
    conf = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
    right = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    y = np.zeros(10, int)
    p = _probs(conf, [0 if r else 1 for r in right])
    assert fit_threshold(y, p, target=0.8, min_confident=1) == pytest.approx(0.7)     # 5 of 6 right
    assert fit_threshold(y, p, target=1.0, min_confident=1) == pytest.approx(0.85)    # 3 of 3
    assert fit_threshold(y, p, target=1.0, min_confident=4) is None                   # never 4 right in a row
    # a level never splits readings of equal confidence
    tied = _probs([0.9, 0.8, 0.8, 0.8], [0, 0, 1, 1])
    assert fit_threshold(np.zeros(4, int), tied, target=0.75, min_confident=1) == pytest.approx(0.9)


def test_band_accuracy_counts_both_sides_with_intervals():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 3, n)
    conf = rng.uniform(0.34, 1.0, n)
    right = rng.uniform(size=n) < conf                    # calibrated-ish: the surer, the more often right
    p = _probs(conf.tolist(), np.where(right, y, (y + 1) % 3).tolist())
    b = band_accuracy(y, p, 0.7, groups=np.arange(n) // 2, n_boot=200)
    sure = conf >= 0.7
    assert b["confident"] == sure.sum() and b["unsure"] == n - sure.sum() and b["n"] == n
    assert b["accuracy_confident"] == pytest.approx(right[sure].mean(), abs=1e-4)
    assert b["accuracy_unsure"] == pytest.approx(right[~sure].mean(), abs=1e-4)
    assert b["accuracy_confident"] > b["accuracy_unsure"]
    lo, hi = b["ci95_confident"]
    assert lo < b["accuracy_confident"] < hi and b["resampled"] == "patients"
    # nothing below the level: no accuracy and no interval there, said as None
    none_below = band_accuracy(y, p, 0.0, n_boot=50)
    assert none_below["unsure"] == 0 and none_below["accuracy_unsure"] is None and none_below["ci95_unsure"] is None
    curve = risk_coverage(y, p)
    assert curve["coverage"][-1] == 1.0 and curve["accuracy"][-1] == pytest.approx(right.mean())
    # one logit's P(positive) reads as two classes
    c, k = top_confidence(np.array([0.2, 0.9]))
    assert c.tolist() == pytest.approx([0.8, 0.9]) and k.tolist() == [0, 1]


def _record(sha: str, threshold=0.74) -> dict:
    band = {"n": 538, "confident": 348, "coverage": 0.6468, "accuracy_confident": 0.8937,
            "ci95_confident": [0.8575, 0.928], "unsure": 190, "accuracy_unsure": 0.6105, "ci95_unsure": [0.54, 0.68]}
    return {"weights_sha256": sha[:12], "data": "eye_disease_4class", "threshold": threshold, "target_accuracy": 0.9,
            "chosen_on": "val", "val": band, "test": band}


def test_a_recorded_level_is_quoted_only_for_the_weights_it_was_measured_on():
    entry = {"sha256": "ab" * 32, "confidence": _record("ab" * 32)}
    assert confidence_of(entry) and confidence_threshold(entry) == 0.74
    sure, unsure = confidence_note(entry, 0.93), confidence_note(entry, 0.55)
    assert sure == ("Confidence: 93% is at or above this model's confident level (74%). On 538 held-out images of "
                    "its own set (eye_disease_4class, test split), the 348 readings that confident were right 89% of "
                    "the time (95% CI 86%-93%).")
    assert unsure.startswith("Confidence: 55% is below this model's confident level (74%).")
    assert "the 190 readings below it were right 61%" in unsure and unsure.endswith("Review the image yourself.")
    other = {"sha256": "cd" * 32, "confidence": _record("ab" * 32)}          # retrained weights: not measured
    assert confidence_of(other) is None and confidence_note(other, 0.93) is None
    assert confidence_threshold(other) == LOW_CONFIDENCE == confidence_threshold({})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A phantom 4-class set and random weights written as `train` writes them (a manifest beside them)."""
    root = tmp_path_factory.mktemp("sel")
    data = root / "fundus"
    write_dataset("fundus-4class", n=60, seed=3, out=data, size=48)
    torch.manual_seed(0)
    net = create_model("fundus_resnet18_head", input_size=(3, 32, 32))
    d = root / "run"
    d.mkdir()
    f = d / "fundus_resnet18_head.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(f))
    entry = {"file": f.name, "sha256": sha256_file(f), "input_size": [3, 32, 32], "temperature": 1.0,
             "classes": list(net.cfg.classes), "config": {"seed": 0}}
    (d / "manifest.json").write_text(json.dumps({"fundus_resnet18_head": entry}))
    return data, d


def test_confidence_command_records_a_level_every_reading_then_quotes(tiny_run, capsys, tmp_path, fundus_png):
    import retina_core as rc

    data, d = tiny_run
    args = ["confidence", "--model", "fundus_resnet18_head", "--data", str(data), "--weights-dir", str(d),
            "--target", "0.2", "--min-confident", "5", "--plots", str(tmp_path), "--json"]
    assert main([*args, "--record"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["chosen_on"] == "val" and r["val"]["accuracy_confident"] >= 0.2 and r["val"]["confident"] >= 5
    assert r["test"]["confident"] + r["test"]["unsure"] == r["test"]["n"] > 0
    assert (tmp_path / "fundus_resnet18_head_risk_coverage.png").stat().st_size > 0
    entry = json.loads((d / "manifest.json").read_text())["fundus_resnet18_head"]
    assert entry["confidence"]["threshold"] == r["threshold"] and "--record" not in entry["confidence"]["command"]
    model = load_model("fundus_resnet18_head", weights_dir=d)
    a = rc.analyze(rc.read_image(fundus_png), model)
    note = [n for n in a.notes if n.startswith("Confidence: ")]
    assert len(note) == 1 and "held-out images of its own set (fundus, test split)" in note[0]
    assert ("Low confidence" in a.suggestion) == (a.probabilities[a.label] < r["threshold"])
    # `evaluate` reports the same split at the recorded level
    assert main(["evaluate", "--model", "fundus_resnet18_head", "--data", str(data), "--weights-dir", str(d),
                 "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["selective"]["level"].startswith("recorded") and ev["selective"]["confident"] == r["test"]["confident"]
    # a level no validation reading reaches is refused with a message, nothing recorded
    assert main([*args[:-1], "--target", "1.01"]) != 0
    assert "lower --target" in capsys.readouterr().err


def test_other_weights_in_the_folder_are_not_given_the_record(tiny_run):
    from retina_core.evaluate.run import confidence_record, record_confidence
    from retina_core.errors import RetinaInputError

    data, d = tiny_run
    rec = confidence_record("fundus_resnet18_head", data, target=0.2, weights_dir=d, n_boot=50, min_confident=5)
    with pytest.raises(RetinaInputError, match="other weights"):
        record_confidence({**rec, "weights_sha256": "0" * 12}, d)
    model = load_model("fundus_resnet18_head", weights_dir=d)
    stale = replace(model, entry={**model.entry, "confidence": {**rec, "weights_sha256": "0" * 12}})
    assert confidence_note(stale.entry, 0.99) is None
