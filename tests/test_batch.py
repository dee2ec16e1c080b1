"""Batch screening: every input gets a row, bad files become error rows, reruns resume, Ray equals local."""
import csv
import json

import pandas as pd
import pytest

from retina_core.analysis import DEFAULT_MODELS
from retina_core.batch import list_inputs, run_batch
from retina_core.cli import main
from tests.conftest import png_bytes


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from retina_core.phantoms import fundus_phantom, oct_phantom

    d = tmp_path_factory.mktemp("archive")
    (d / "sub").mkdir()
    (d / "a_oct.png").write_bytes(png_bytes(oct_phantom("DME", seed=5).image))
    (d / "sub" / "b_oct.png").write_bytes(png_bytes(oct_phantom("NORMAL", seed=6).image))
    (d / "c_fundus.png").write_bytes(png_bytes(fundus_phantom("Severe", seed=7, size=320).image))
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (d / ".hidden.png").write_bytes(b"ignored")
    return d


def _rows(path):
    with open(path, newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def assert_same_rows(path_a, path_b, tolerance: float) -> None:
    """The same files, labels and errors, and probabilities within `tolerance`."""
    a, b = _rows(path_a), _rows(path_b)
    assert a.keys() == b.keys()
    for f in a:
        assert a[f]["label"] == b[f]["label"] and a[f]["error"] == b[f]["error"]
        if a[f]["probabilities"]:
            pa, pb = json.loads(a[f]["probabilities"]), json.loads(b[f]["probabilities"])
            assert max(abs(pa[c] - pb[c]) for c in pa) <= tolerance


def test_local_batch_rows_errors_heatmaps_and_resume(archive, tmp_path):
    out = tmp_path / "results.csv"
    summary = run_batch(archive, out, heatmaps=tmp_path / "maps", batch_size=2, num_workers=1, progress=False)
    assert summary["inputs"] == 4 and summary["processed"] == 4 and summary["errors"] == 1
    rows = _rows(out)
    assert len(rows) == 4
    bad = rows[str(archive / "broken.jpg")]
    assert bad["error"] and not bad["label"]
    for name in ("a_oct.png", "sub/b_oct.png", "c_fundus.png"):
        r = rows[str(archive / name)]
        probs = json.loads(r["probabilities"])
        assert abs(sum(probs.values()) - 1) < 1e-4 and r["label"] in probs
        assert len(r["content_hash"]) == 64 and (tmp_path / "maps").joinpath(r["heatmap"].split("/")[-1]).exists()
    assert rows[str(archive / "c_fundus.png")]["model"] == DEFAULT_MODELS["fundus"]
    # the written map is the app's Grad-CAM of the predicted class, as 8-bit grey at the image's size
    import numpy as np
    from PIL import Image

    from retina_core import explain
    from retina_core.analysis import get_model
    from retina_core.io.decode import read_image

    r = rows[str(archive / "a_oct.png")]
    img = read_image(archive / "a_oct.png")
    written = np.asarray(Image.open(r["heatmap"]))
    assert written.dtype == np.uint8 and written.shape == img.pixels.shape[:2]
    expected = explain(get_model(r["model"]), img.pixels, "gradcam", r["label"])
    assert np.abs(written / 255.0 - expected).max() <= 1.5 / 255
    assert pd.read_parquet(out.with_suffix(".parquet")).shape[0] == 4
    again = run_batch(archive, out, num_workers=0, progress=False)
    assert again["skipped_already_done"] == 4 and again["processed"] == 0
    assert len(_rows(out)) == 4


def test_batch_matches_single_image_analysis(archive, tmp_path):
    import retina_core as rc

    out = tmp_path / "r.csv"
    run_batch(archive, out, num_workers=0, progress=False)
    row = _rows(out)[str(archive / "a_oct.png")]
    a = rc.analyze(rc.read_image(archive / "a_oct.png"))
    assert row["label"] == a.label
    probs = json.loads(row["probabilities"])
    assert max(abs(probs[c] - a.probabilities[c]) for c in probs) < 1e-4
    # "confident": the same level a reading's suggestion uses (the model's recorded one, or the default)
    assert row["confident"] == str("Low confidence" not in a.suggestion)


def test_resuming_results_written_before_the_confident_column_keeps_their_columns(archive, tmp_path):
    from retina_core.batch import COLUMNS

    out = tmp_path / "old.csv"
    old = [c for c in COLUMNS if c != "confident"]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old)
        w.writeheader()
        w.writerow({c: "" for c in old} | {"file": str(archive / "broken.jpg"), "error": "unreadable"})
    run_batch(archive, out, num_workers=0, progress=False)
    with open(out, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == old and len(lines) == 5 and all(len(r) == len(old) for r in lines)


def test_csv_input_and_cli(archive, tmp_path, capsys):
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + str(archive / "a_oct.png") + "\n" + str(archive / "c_fundus.png") + "\n")
    assert list_inputs(listing) == [str(archive / "a_oct.png"), str(archive / "c_fundus.png")]
    assert main(["batch", str(listing), "--out", str(tmp_path / "o.csv"), "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["processed"] == 2


def test_ray_engine_equals_local(archive, tmp_path):
    ray = pytest.importorskip("ray")
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    run_batch(archive, local, num_workers=0, progress=False)
    try:
        run_batch(archive, remote, engine="ray", batch_size=2, progress=False)
    finally:
        ray.shutdown()
    assert_same_rows(local, remote, 1e-4)


def test_onnx_runtime_batch_equals_torch_within_its_tolerance(archive, tmp_path, capsys):
    from retina_core.runtime import TOLERANCE

    torch_csv, onnx_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    run_batch(archive, torch_csv, num_workers=0, progress=False)
    assert main(["batch", str(archive), "--out", str(onnx_csv), "--workers", "0", "--runtime", "onnx",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runtime"] == "onnx"
    assert_same_rows(torch_csv, onnx_csv, TOLERANCE + 1e-6)
    # heatmaps need gradients: asking for both is refused with a message, not a traceback
    assert main(["batch", str(archive), "--out", str(tmp_path / "x.csv"), "--runtime", "onnx",
                 "--heatmaps", str(tmp_path / "m")]) != 0
    assert "predictions only" in capsys.readouterr().err


def test_onnx_predictor_checks_itself_against_torch():
    import torch

    from retina_core.models import create_model
    from retina_core.models.loading import LoadedModel
    from retina_core.runtime import OnnxPredictor

    torch.manual_seed(0)
    net = create_model("retinal_fusion_net_atto", input_size=(3, 64, 64)).eval()
    m = LoadedModel("retinal_fusion_net_atto", net.cfg, net, torch.device("cpu"), "0" * 64, temperature=1.5)
    pred = OnnxPredictor(m)
    x = torch.randn(3, 3, 64, 64)
    p = pred.predict_proba(x)
    assert p.shape == (3, 8) and abs(p.sum(1) - 1).max() < 1e-5
    assert abs(p - m.predict_proba(x).numpy()).max() < 1e-4 and pred.max_abs_diff < 1e-4


def test_batch_benchmark_runs_every_configuration():
    """`bench --only batch_throughput` on a tiny archive: every configuration measured for both default models
    (figures are recorded in docs/benchmarks.md, never asserted here)."""
    from retina_core.bench import bench_batch_throughput, format_markdown

    from retina_core.analysis import DEFAULT_MODELS

    r = bench_batch_throughput(n_images=4, batch_size=2, repeats=1)
    assert set(r["models"]) == {DEFAULT_MODELS["oct"], DEFAULT_MODELS["fundus"]}
    for m in r["models"].values():
        assert set(m["ratio"]) == {"floor", "default", "workers_2", "heatmaps"}
        assert all(v > 0 for v in m["img_per_s"].values())
    assert f"| {DEFAULT_MODELS['oct']} |" in format_markdown({"batch_throughput": r})
