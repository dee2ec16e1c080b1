"""Counterfactual phantoms for 2-D OCT B-scan classifiers (`audit.counterfactual.image_lesion_reliance`) and the
"masked" part every phantom eye can be re-rendered without (the volume side is in test_audit_evaluate_nd.py)."""
import csv
import json

import numpy as np
import pytest

from retina_core.audit.common import Sample, resize_sample
from retina_core.errors import RetinaInputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")     # one torch thread here too (conftest)


@pytest.fixture(scope="module")
def bscan_dir(tmp_path_factory):
    from retina_core.phantoms import write_dataset

    out = tmp_path_factory.mktemp("oct_cf")
    write_dataset("oct-kermany", 8, 3, out, size=64)
    return out


def _rows(root):
    with open(root / "phantom_meta.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_masked_part_removes_every_masked_lesion_and_nothing_else_of_the_eye():
    from retina_core.phantoms.oct import oct_phantom
    from retina_core.phantoms.volume import oct_volume

    for label in ("CNV", "DME", "DRUSEN", "CSR", "MH", "AMD", "DR"):
        a = oct_phantom(label, 11, 96, 96, patient_seed=5)
        b = oct_phantom(label, 11, 96, 96, patient_seed=5, without=("masked",))
        assert a.masks and not b.masks, label                     # the pointing game's whole target is gone
        assert np.array_equal(a.image, oct_phantom(label, 11, 96, 96, patient_seed=5).image)   # re-render is exact
        assert a.meta["patient_seed"] == 5 and not np.array_equal(a.image, b.image)
    # a DR eye's only masked lesions are its foci: "masked" and "ellipsoids" leave out the same thing
    dr = [oct_volume("DR", 0, 8, 48, 48, without=w).image for w in (("masked",), ("ellipsoids",))]
    assert np.array_equal(*dr)
    # a normal B-scan has nothing to leave out; the vessels, speckle and layers stay
    n = [oct_phantom("NORMAL", 4, 64, 64, patient_seed=1, without=w).image for w in ((), ("masked",))]
    assert np.array_equal(*n)


def test_written_bscans_re_render_exactly_from_the_csv(bscan_dir):
    from PIL import Image

    from retina_core.audit.counterfactual import JPEG_QUALITY, _jpeg_round_trip
    from retina_core.phantoms.oct import oct_phantom

    rows = _rows(bscan_dir)
    assert rows and all(r["patient_seed"] for r in rows)
    for r in rows[:3]:
        stored = np.asarray(Image.open(bscan_dir / r["path"]).convert("L"))
        ph = oct_phantom(r["label"], int(r["seed"]), int(r["width"]), int(r["height"]),
                         patient_seed=int(r["patient_seed"]))
        assert np.array_equal(_jpeg_round_trip(ph.image, JPEG_QUALITY["oct"]), stored)


def test_bscan_report_compares_the_same_b_scans(bscan_dir, monkeypatch):
    """A stand-in model whose probability of class k is mean intensity / (k + 1) (normalised): every figure of the
    report can be recomputed from the phantoms."""
    from retina_core.audit import counterfactual as cf
    from retina_core.models import create_model
    from retina_core.phantoms.oct import oct_phantom

    net = create_model("oct_resnet18", input_size=(3, 64, 64)).eval()
    classes = list(net.cfg.classes)
    w = 1.0 / np.arange(1, len(classes) + 1)
    w = w / w.sum()

    def fake_batch(m, images, method):
        x = images.astype(np.float32) / 255.0
        probs = np.stack([x[i].mean() * w for i in range(len(x))])
        return x.mean(-1), probs, [int(np.argmax(p)) for p in probs]

    monkeypatch.setattr(cf, "explain_batch", fake_batch)
    rep = cf.image_lesion_reliance(net, bscan_dir)
    rows = [r for r in _rows(bscan_dir) if r["label"] in classes and r["label"] != "NORMAL"]
    assert rep["modality"] == "oct" and rep["n_volumes"] == len(rows) == sum(s["n"] for s in rep["per_class"].values())

    def p(r, without=()):
        ph = oct_phantom(r["label"], int(r["seed"]), int(r["width"]), int(r["height"]),
                         patient_seed=int(r["patient_seed"]), without=without)
        img = cf._jpeg_round_trip(ph.image, cf.JPEG_QUALITY["oct"])
        s = resize_sample(Sample(cf.to_pixels(img), r["label"], None), (64, 64))
        return float((s.image.astype(np.float32) / 255.0).mean() * w[classes.index(r["label"])])

    for cls, s in rep["per_class"].items():
        mine = [r for r in rows if r["label"] == cls]
        assert s["original"]["p_disease"] == pytest.approx(np.mean([p(r) for r in mine]), abs=1e-6)
        assert "p_disease_no_record" not in s["original"]        # a B-scan comes without a clinical record
        assert s["original"]["called"] == sum(classes.index(cls) == 0 for _ in mine)   # argmax is always class 0
        for name, without in cf.VARIANTS.items():
            if name == "original":
                continue
            drops = [p(r) - p(r, without) for r in mine if p(r, without) != p(r)]
            if not drops:
                assert s[name] is None
            else:
                assert s[name]["n"] == len(drops) and s[name]["drop"] == pytest.approx(np.mean(drops), abs=1e-6)
        assert s["pointing_game"] is None or 0.0 <= s["pointing_game"] <= 1.0
    table = cf.table_rows(rep)
    assert [t["class"] for t in table] == list(rep["per_class"])
    assert all(t["drop no masked lesions"] == (rep["per_class"][t["class"]]["without_masked"] or {}).get("drop")
               for t in table)
    lines = cf.format_lines(rep)                    # heading, columns, a row per class, P(healthy), the note
    assert len(lines) == len(rep["per_class"]) + 4 and lines[-2].startswith("P(NORMAL) without the masked lesions")


def test_cli_counterfactual_on_a_bscan_model_and_its_refusals(bscan_dir, tmp_path, capsys):
    import shutil

    from retina_core.cli import main
    from retina_core.testing import write_test_weights

    wd = write_test_weights(tmp_path / "w", ["oct_resnet18"])
    code = main(["explain-eval", "--model", "oct_resnet18", "--data", str(bscan_dir), "--weights-dir", str(wd),
                 "--n", "8", "--steps", "2", "--stability", "", "--no-randomisation", "--counterfactual", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    rep = json.loads(out)
    cf = rep["counterfactual"]
    assert cf["modality"] == "oct" and cf["method"] == "gradcam" and cf["n_volumes"] >= 1
    assert set(cf["per_class"]) <= {"CNV", "DME", "DRUSEN"}
    for cls, s in cf["per_class"].items():           # the same draw as explain-eval's: the same pointing game
        assert s["pointing_game"] == pytest.approx(rep["methods"]["gradcam"]["pointing_game_by_label"][cls])
        assert 0.0 <= s["original"]["p_disease"] <= 1.0 and s["without_masked"]["n"] == s["n"]
    # a set written before the patient_seed column: refused by name, with the way out
    old = tmp_path / "old"
    shutil.copytree(bscan_dir, old)
    rows = _rows(old)
    with open(old / "phantom_meta.csv", "w", newline="") as fh:
        cols = [c for c in rows[0] if c != "patient_seed"]
        wr = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    from retina_core.audit.counterfactual import image_lesion_reliance

    with pytest.raises(RetinaInputError, match="patient_seed"):
        image_lesion_reliance("oct_resnet18", old, weights_dir=wd)
    # a B-scan that is not what its seeds draw
    edited = tmp_path / "edited"
    shutil.copytree(bscan_dir, edited)
    r = next(r for r in _rows(edited) if r["label"] != "NORMAL")
    from PIL import Image

    im = np.asarray(Image.open(edited / r["path"]))
    Image.fromarray(im[::-1].copy()).save(edited / r["path"], format="JPEG", quality=92)
    with pytest.raises(RetinaInputError, match="does not re-render from its seed"):
        image_lesion_reliance("oct_resnet18", edited, weights_dir=wd)
    # the wrong kind of set for the model: one clear line, no traceback
    code = main(["explain-eval", "--model", "fundus_oct_fusion", "--data", str(bscan_dir), "--counterfactual"])
    err = capsys.readouterr().err
    assert code == 2 and "reads fundus + OCT pairs" in err and "Traceback" not in err


def test_fundus_counterfactual_removes_the_lesions_and_keeps_the_eye(tmp_path, monkeypatch):
    """A fundus DR eye without its masked lesions: only pixels at the lesions change (vessels keep their width: the
    beading is gone, the vessel is not). The report on a written fundus-dr set recomputes with a stand-in model."""
    from scipy import ndimage

    from retina_core.audit import counterfactual as cf
    from retina_core.models import create_model
    from retina_core.phantoms import write_dataset
    from retina_core.phantoms.fundus import fundus_phantom

    a = fundus_phantom("Severe", 3, 192)
    b = fundus_phantom("Severe", 3, 192, without=("masked",))
    near = ndimage.binary_dilation(np.logical_or.reduce(list(a.masks.values())), iterations=4)
    changed = np.abs(a.image.astype(int) - b.image.astype(int)).max(-1) > 2
    assert a.masks and not b.masks and changed.any() and not (changed & ~near).any()
    assert np.array_equal(fundus_phantom("Severe", 3, 192).image, a.image)
    with pytest.raises(ValueError, match="optic cup"):
        fundus_phantom("glaucoma", 3, 64, without=("masked",))
    with pytest.raises(ValueError, match="unknown part"):
        fundus_phantom("Mild", 3, 64, without=("thickening",))

    root = tmp_path / "dr"
    write_dataset("fundus-dr", 5, 2, root, size=96)
    net = create_model("fundus_dr_effnet_b0", input_size=(3, 64, 64)).eval()
    classes = list(net.cfg.classes)
    w = np.linspace(2, 1, len(classes))
    w = w / w.sum()
    monkeypatch.setattr(cf, "explain_batch", lambda m, images, method: (
        images.mean(-1) / 255.0, np.stack([im.mean() / 255.0 * w for im in images]), [0] * len(images)))
    rep = cf.image_lesion_reliance(net, root)
    assert rep["modality"] == "fundus" and rep["variants"] == ["original", "without_masked"]
    assert rep["healthy_class"] == "No DR" and "No DR" not in rep["per_class"]
    assert list(rep["per_class"]) == [c for c in classes if c in rep["per_class"]]      # grade order
    for cls, s in rep["per_class"].items():
        rows = [r for r in _rows(root) if r["label"] == cls]
        k = classes.index(cls)

        def p(r, without=()):
            img = fundus_phantom(cls, int(r["seed"]), 96, without=without).image
            s_ = resize_sample(Sample(img, cls, None), (64, 64))
            return float(s_.image.mean() / 255.0 * w[k])

        assert s["original"]["p_disease"] == pytest.approx(np.mean([p(r) for r in rows]), abs=1e-6)
        assert s["without_masked"]["drop"] == pytest.approx(
            np.mean([p(r) - p(r, ("masked",)) for r in rows]), abs=1e-6)
        assert s["without_masked"]["p_healthy"] == pytest.approx(
            np.mean([p(r, ("masked",)) / w[k] * w[0] for r in rows]), abs=1e-6)
    table = cf.table_rows(rep)
    assert all("P no cysts/foci" not in t and "P No DR, no masked lesions" in t for t in table)
