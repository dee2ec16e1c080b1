"""AuditLog: JSONL lines with time, content hash, model, weights hash and outputs; no arrays, no patient data."""

import hashlib
import json
import threading

import numpy as np
import pytest

from retina_core.audit_log import AuditLog

H = hashlib.sha256(b"scan bytes").hexdigest()
W = hashlib.sha256(b"weights").hexdigest()


def test_record_writes_one_json_line_per_call(tmp_path):
    log = AuditLog(tmp_path / "sub" / "audit.jsonl")
    outputs = {"label": "CNV", "probabilities": {"CNV": np.float32(0.75), "NORMAL": 0.25}, "gradable": np.bool_(True),
               "n": np.int64(3)}
    e = log.record(H, "oct_resnet18", W, outputs)
    log.record(H, "oct_resnet18", None, {"label": None})
    lines = (tmp_path / "sub" / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {"time", "content_hash", "model", "weights_sha256", "outputs"}
    assert first["content_hash"] == H and first["weights_sha256"] == W and first["model"] == "oct_resnet18"
    assert first["outputs"]["probabilities"] == {"CNV": 0.75, "NORMAL": 0.25} and first["outputs"]["gradable"] is True
    assert first["time"].endswith("+00:00") and e["outputs"]["n"] == 3
    assert log.entries()[1]["weights_sha256"] is None


@pytest.mark.parametrize("bad", [{"heatmap": np.zeros((64, 64))}, {"x": object()}, {"x": list(range(5000))}])
def test_arrays_and_objects_are_refused(tmp_path, bad):
    log = AuditLog(tmp_path / "a.jsonl")
    with pytest.raises((TypeError, ValueError)):
        log.record(H, "m", W, bad)
    assert log.entries() == []


def test_hashes_must_be_sha256(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl")
    with pytest.raises(ValueError):
        log.record("DOE^JOHN", "m", W, {})  # anything but a digest (e.g. a name) is refused
    with pytest.raises(ValueError):
        log.record(H, "m", "not-a-hash", {})


def test_concurrent_appends_do_not_interleave(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl")

    def work(i):
        for j in range(25):
            AuditLog(tmp_path / "a.jsonl").record(H, f"m{i}", W, {"j": j, "text": "x" * 500})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = log.entries()
    assert len(entries) == 100 and all(e["outputs"]["text"] == "x" * 500 for e in entries)


def test_analyze_writes_the_audit_log_without_patient_data(tmp_path, monkeypatch, oct_png):
    import json

    import retina_core as rc

    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("RETINA_AUDIT_LOG", str(log))
    a = rc.analyze(rc.read_image(oct_png))
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["content_hash"] == a.content_hash and entry["model"] == rc.DEFAULT_MODELS["oct"] == a.model
    assert entry["weights_sha256"] == a.weights_sha256 and entry["outputs"]["label"] == a.label
    assert oct_png.name not in log.read_text()
