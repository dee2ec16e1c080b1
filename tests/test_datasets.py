"""Data set adapters: layout detection, records, patient-level splits, the torch Dataset. Tiny trees, seconds."""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from retina_core.errors import RetinaInputError
from retina_core.io.datasets import (
    DatasetIndex, ImageDataset, Record, detect_layout, inspect_dataset, load_dataset, patient_split,
)
from retina_core.labels import DR_GRADES, FUNDUS4, OCT4, OCT8


def _img_bytes(fmt: str = "PNG", value: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (value, value // 2, 30)).save(buf, format=fmt)
    return buf.getvalue()


_PNG = None


def _touch(path: Path, real: bool = False) -> Path:
    """An image file: a real 48x40 PNG/JPEG (the decoder refuses < 32 px) when it must decode, else an empty file (detection reads names only)."""
    global _PNG
    path.parent.mkdir(parents=True, exist_ok=True)
    if real:
        fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
        path.write_bytes(_img_bytes(fmt))
    else:
        path.write_bytes(b"")
    return path


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _kermany(top: Path, splits=("train", "val", "test"), real: bool = False) -> Path:
    for s in splits:
        for c in OCT4:
            for pid in (100, 101) if s == "train" else (200 + OCT4.index(c),):
                for n in (1, 2):
                    _touch(top / s / c / f"{c}-{pid}{OCT4.index(c)}-{n}.jpeg", real=real)
    return top


# --------------------------------------------------------------------------------------------- kermany
def test_kermany_kaggle_trailing_space(tmp_path):
    top = _kermany(tmp_path / "OCT2017 ")
    (top / ".DS_Store").write_bytes(b"x")
    _touch(top / "train" / "CNV" / ".hidden.jpeg")
    _touch(top / "train" / "CNV" / "Thumbs.db")
    _touch(top / "train" / "masks" / "CNV-1000-1.png")  # phantom masks beside the images are ignored
    _touch(top / "train" / "CNV" / "masks" / "CNV-1000-1_mask.png")
    for point_at in (tmp_path, top):  # the parent or "OCT2017 " itself
        assert detect_layout(point_at) == "kermany"
        idx = load_dataset(point_at)
        assert idx.layout == "kermany" and idx.root == top
        assert idx.classes == list(OCT4)
        counts = idx.counts()
        assert list(counts) == ["train", "val", "test"]
        assert counts["train"] == {c: 4 for c in OCT4}
        assert counts["val"] == {c: 2 for c in OCT4}
    rec = next(r for r in idx.records if r.path.name == "CNV-1000-1.jpeg")
    assert rec.patient_id == "1000" and rec.label == "CNV" and rec.split == "train" and rec.eye is None
    assert not any("masks" in r.path.parts or r.path.name.startswith(".") for r in idx.records)


def test_kermany_mendeley_train_test_only(tmp_path):
    top = _kermany(tmp_path / "ZhangLabData" / "CellData" / "OCT", splits=("train", "test"))
    _touch(tmp_path / "ZhangLabData" / "CellData" / "chest_xray" / "train" / "NORMAL" / "x.jpeg")
    for point_at in (tmp_path, tmp_path / "ZhangLabData" / "CellData", top):
        idx = load_dataset(point_at)
        assert idx.layout == "kermany" and idx.root == top
        assert list(idx.counts()) == ["train", "test"]
    plain = _kermany(tmp_path / "other" / "OCT2017", splits=("train", "test"))
    assert load_dataset(tmp_path / "other").root == plain


def test_kermany_by_name_with_subset_of_classes_is_not_octc8(tmp_path):
    for c in ("CNV", "NORMAL"):
        _touch(tmp_path / "train" / c / f"{c}-5-1.jpeg")
    assert detect_layout(tmp_path) == "kermany"


# --------------------------------------------------------------------------------------------- octc8
def test_octc8_either_level(tmp_path):
    outer = tmp_path / "RetinalOCT_Dataset"
    inner = outer / "RetinalOCT_Dataset"
    for s in ("train", "val", "test"):
        for c in OCT8:
            _touch(inner / s / c / f"{c.lower()}_{s}_1.jpg")
    for point_at in (tmp_path, outer, inner):
        idx = load_dataset(point_at)
        assert idx.layout == "octc8" and idx.root == inner
        assert idx.classes == list(OCT8)
        assert idx.counts()["test"] == {c: 1 for c in OCT8}


# --------------------------------------------------------------------------------------------- kaggle4 / ieee4
def test_kaggle4_patient_and_eye(tmp_path):
    ds = tmp_path / "dataset"
    _touch(ds / "cataract" / "1234_left.jpg")
    _touch(ds / "cataract" / "1234_right.JPG")
    _touch(ds / "glaucoma" / "77_right.jpeg")
    _touch(ds / "normal" / "8_left.png")
    _touch(ds / "diabetic_retinopathy" / "_0_4015166.jpg")
    _touch(ds / "normal" / "notes.txt")
    for point_at in (tmp_path, ds):
        idx = load_dataset(point_at)
        assert idx.layout == "kaggle4" and idx.root == ds
    assert idx.classes == list(FUNDUS4)
    assert idx.counts() == {"unsplit": {"cataract": 2, "diabetic_retinopathy": 1, "glaucoma": 1, "normal": 1}}
    by_name = {r.path.name: r for r in idx.records}
    assert (by_name["1234_left.jpg"].patient_id, by_name["1234_left.jpg"].eye) == ("1234", "OS")
    assert (by_name["1234_right.JPG"].patient_id, by_name["1234_right.JPG"].eye) == ("1234", "OD")
    assert by_name["_0_4015166.jpg"].patient_id is None


def test_ieee4_cat_to_name(tmp_path):
    (tmp_path / "cat_to_name.json").write_text(json.dumps(
        {"1": "Cataract", "2": "Diabetic Retinopathy", "3": "Glaucoma", "4": "Normal"}))
    for s in ("train_dir", "valid_dir", "test_dir"):
        for k in "1234":
            _touch(tmp_path / s / k / f"{k}_{s}_3_left.png")
    idx = load_dataset(tmp_path)
    assert idx.layout == "ieee4"
    assert idx.classes == list(FUNDUS4)
    assert idx.counts()["val"] == {c: 1 for c in FUNDUS4}
    assert {r.label for r in idx.records if r.path.parent.name == "2"} == {"diabetic_retinopathy"}
    (tmp_path / "cat_to_name.json").unlink()
    with pytest.raises(RetinaInputError, match="cat_to_name.json"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------------- aptos
def test_aptos_labels_and_missing_images(tmp_path):
    _write_csv(tmp_path / "train.csv", ["id_code", "diagnosis"], [["a1", 0], ["b2", 2], ["c3", 4], ["gone", 1]])
    _write_csv(tmp_path / "test.csv", ["id_code"], [["t1"]])
    for i in ("a1", "b2", "c3"):
        _touch(tmp_path / "train_images" / f"{i}.png")
    _touch(tmp_path / "test_images" / "t1.png")
    idx = load_dataset(tmp_path / "train.csv")
    assert idx.layout == "aptos" and idx.root == tmp_path
    assert idx.classes == [DR_GRADES[0], DR_GRADES[2], DR_GRADES[4]]
    assert {r.meta["id_code"]: r.label for r in idx.records} == {"a1": "No DR", "b2": "Moderate",
                                                                 "c3": "Proliferative DR"}
    assert all(r.split is None for r in idx.records)
    assert any("gone" in w for w in idx.warnings)
    _write_csv(tmp_path / "train.csv", ["id_code", "diagnosis"], [["a1", 7]])
    with pytest.raises(RetinaInputError, match="0-4"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------------- odir
_ODIR_HEADER = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
                "Right-Diagnostic Keywords", "N", "D", "G", "C", "A", "H", "M", "O"]


def _odir_rows():
    return [[0, 69, "Female", "0_left.jpg", "0_right.jpg", "cataract", "normal fundus", 0, 0, 0, 1, 0, 0, 0, 0],
            [1, 57, "Male", "1_left.jpg", "1_right.jpg", "normal fundus", "normal fundus", 1, 0, 0, 0, 0, 0, 0, 0],
            [2, 42, "Male", "2_left.jpg", "2_right.jpg", "npdr", "glaucoma", 0, 1, 1, 0, 0, 0, 0, 0]]


def _check_odir(idx: DatasetIndex):
    assert idx.layout == "odir"
    assert idx.classes == ["N", "C", "multi"]
    assert len(idx.records) == 6
    left0 = next(r for r in idx.records if r.path.name == "0_left.jpg")
    assert (left0.patient_id, left0.eye, left0.label) == ("0", "OS", "C")
    assert left0.meta["age"] == 69 and left0.meta["sex"] == "Female"
    r2 = next(r for r in idx.records if r.path.name == "2_right.jpg")
    assert r2.label == "multi" and r2.eye == "OD" and r2.meta["flags"]["D"] == 1 and r2.meta["flags"]["G"] == 1


def test_odir_csv(tmp_path):
    _write_csv(tmp_path / "data.csv", _ODIR_HEADER, _odir_rows())
    for pid in range(3):
        for side in ("left", "right"):
            _touch(tmp_path / "Training Images" / f"{pid}_{side}.jpg")
    assert detect_layout(tmp_path) == "odir"
    _check_odir(load_dataset(tmp_path))


def test_odir_xlsx(tmp_path):
    pytest.importorskip("openpyxl")
    import pandas as pd

    d = tmp_path / "ODIR-5K" / "ODIR-5K"
    pd.DataFrame(_odir_rows(), columns=_ODIR_HEADER).to_excel(d.mkdir(parents=True) or d / "data.xlsx", index=False)
    for pid in range(3):
        for side in ("left", "right"):
            _touch(d / "Training Images" / f"{pid}_{side}.jpg")
    _check_odir(load_dataset(tmp_path))


# --------------------------------------------------------------------------------------------- volumes / paired
def test_volumes_metadata(tmp_path):
    for name in ("v1.nii.gz", "v2.nii", "v3.nii.gz", "orphan.nii"):
        (tmp_path / "vols").mkdir(exist_ok=True)
        (tmp_path / "vols" / name).write_bytes(b"")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "v1.nii.gz").write_bytes(b"")
    _write_csv(tmp_path / "metadata.csv", ["file", "label", "age", "sex", "cst_um"],
               [["v1.nii.gz", 1, 71, "F", 312.5], ["v2", 0, "64", "M", ""], ["v3.nii.gz", 1, 80, "M", "288"]])
    idx = load_dataset(tmp_path)
    assert idx.layout == "volumes"
    assert idx.classes == ["0", "1"]
    assert idx.counts() == {"unsplit": {"0": 1, "1": 2}}
    v2 = next(r for r in idx.records if r.path.name == "v2.nii")
    assert v2.meta["age"] == 64 and v2.meta["sex"] == "M" and v2.meta["cst_um"] is None
    v1 = next(r for r in idx.records if r.path.name == "v1.nii.gz")
    assert v1.meta["cst_um"] == 312.5 and "masks" not in v1.path.parts
    assert any("orphan" in w for w in idx.warnings)


def test_paired(tmp_path):
    rows = []
    for pid, label in (("p1", "disease"), ("p2", "normal")):
        _touch(tmp_path / "fundus" / f"{pid}.png")
        _touch(tmp_path / "oct" / f"{pid}.png")
        rows.append([pid, f"fundus/{pid}.png", f"oct/{pid}.png", label])
    rows.append(["p3", "fundus/missing.png", "oct/p1.png", "normal"])
    _write_csv(tmp_path / "pairs.csv", ["patient_id", "fundus", "oct", "label"], rows)
    idx = load_dataset(tmp_path)
    assert idx.layout == "paired" and idx.classes == ["disease", "normal"]
    r = idx.records[0]
    assert r.patient_id == "p1" and r.path == tmp_path / "fundus" / "p1.png"
    assert Path(r.meta["partner"]) == tmp_path / "oct" / "p1.png"
    assert len(idx.records) == 2 and idx.warnings


# --------------------------------------------------------------------------------------------- folders / phantoms
def test_generic_folders_and_splits(tmp_path):
    for c in ("healthy", "sick"):
        for i in range(3):
            _touch(tmp_path / "flat" / c / f"img{i}.PNG")
            _touch(tmp_path / "split" / "train" / c / f"img{i}.tif")
        _touch(tmp_path / "split" / "validation" / c / "v.bmp")
    idx = load_dataset(tmp_path / "flat")
    assert idx.layout == "folders" and idx.classes == ["healthy", "sick"]
    assert idx.counts() == {"unsplit": {"healthy": 3, "sick": 3}}
    idx = load_dataset(tmp_path / "split")
    assert idx.layout == "folders" and idx.counts()["val"] == {"healthy": 1, "sick": 1}


def test_phantom_meta_fills_records(tmp_path):
    top = tmp_path / "OCT2017 "
    rows = []
    for c in OCT4:
        p = _touch(top / "train" / c / f"{c}-9{OCT4.index(c)}-1.jpeg")
        rows.append([str(p.relative_to(tmp_path)), c, f"P{OCT4.index(c) % 2}", "OS", 60 + OCT4.index(c), "F", 1.5])
    _write_csv(tmp_path / "phantom_meta.csv", ["path", "label", "patient_id", "eye", "age", "sex", "snr"], rows)
    idx = load_dataset(tmp_path)
    assert idx.layout == "kermany"
    rec = next(r for r in idx.records if r.label == "DME")
    assert (rec.patient_id, rec.eye, rec.meta["age"], rec.meta["sex"]) == ("P1", "OS", 61, "F")
    assert "phantom_meta.csv" not in {r.path.name for r in idx.records}


# --------------------------------------------------------------------------------------------- errors
def test_unrecognised_folder_is_helpful(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetinaInputError) as e:
        detect_layout(tmp_path)
    msg = str(e.value)
    for name in ("kermany", "aptos", "octc8", "kaggle4", "ieee4", "odir", "volumes", "paired", "folders"):
        assert name in msg
    assert "train.csv" in msg and "cat_to_name.json" in msg
    with pytest.raises(RetinaInputError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(RetinaInputError, match="aptos"):
        load_dataset(_kermany(tmp_path / "k"), layout="aptos")
    with pytest.raises(RetinaInputError, match="Unknown layout"):
        load_dataset(tmp_path, layout="bogus")


# --------------------------------------------------------------------------------------------- splitting
def _many_records(n_patients: int = 40, per_patient: int = 3) -> list[Record]:
    recs = []
    for p in range(n_patients):
        label = OCT4[p % 4]
        for k in range(per_patient + p % 2):
            recs.append(Record(path=Path(f"/d/{label}-{p}-{k}.jpeg"), label=label, split=None, patient_id=str(p),
                               eye=None))
    return recs


def test_patient_split_grouped_stratified_deterministic():
    recs = _many_records()
    a = patient_split(recs, seed=1)
    assert list(a) == ["train", "val", "test"]
    assert sum(len(v) for v in a.values()) == len(recs)
    owners = {}
    for split, rs in a.items():
        for r in rs:
            assert r.split == split
            assert owners.setdefault(r.patient_id, split) == split  # no patient in two splits
        assert {r.label for r in rs} == set(OCT4)  # stratified: every class in every split
    assert 0.65 < len(a["train"]) / len(recs) < 0.9
    b = patient_split(list(reversed(recs)), seed=1)
    assert {s: sorted(str(r.path) for r in v) for s, v in a.items()} == \
           {s: sorted(str(r.path) for r in v) for s, v in b.items()}
    c = patient_split(recs, seed=2)
    assert {s: {r.patient_id for r in v} for s, v in a.items()} != {s: {r.patient_id for r in v} for s, v in c.items()}
    assert all(r.split is None for r in recs)  # inputs untouched


def test_patient_split_small_classes_and_no_patient_ids():
    recs = [Record(path=Path(f"/x/{c}{i}.png"), label=c, split=None, patient_id=None, eye=None)
            for c in ("a", "b") for i in range(3)]
    s = patient_split(recs, seed=0)
    for split in ("train", "val", "test"):
        assert Counter(r.label for r in s[split]) == {"a": 1, "b": 1}
    with pytest.raises(RetinaInputError, match="add up to 1"):
        patient_split(recs, fractions=(0.5, 0.2, 0.2))


def test_patient_split_keeps_existing_splits(tmp_path):
    idx = load_dataset(_kermany(tmp_path / "OCT2017 ", splits=("train", "test")))
    kept = patient_split(idx.records)
    assert list(kept) == ["train", "test"]
    assert len(kept["test"]) == idx.counts()["test"]["CNV"] * 4
    forced = patient_split(idx.records, force=True)
    assert list(forced) == ["train", "val", "test"]
    owners = {}
    for split, rs in forced.items():
        for r in rs:
            assert owners.setdefault(r.patient_id, split) == split


# --------------------------------------------------------------------------------------------- inspect / torch
def test_inspect_dataset_json(tmp_path):
    ds = tmp_path / "dataset"
    for c in FUNDUS4:
        _touch(ds / c / f"{FUNDUS4.index(c)}_left.jpg")
        _touch(ds / c / f"{FUNDUS4.index(c)}_right.jpg")
    info = inspect_dataset(tmp_path)
    json.dumps(info)
    assert info["layout"] == "kaggle4" and info["classes"] == list(FUNDUS4)
    assert info["n_patients"] == 4 and info["n_images"] == 8 and info["eyes"] == {"OD": 4, "OS": 4}
    assert info["splits"] == [] and info["counts"]["unsplit"]["glaucoma"] == 2
    assert isinstance(info["warnings"], list) and info["root"] == str(ds)


def test_image_dataset_tensors(tmp_path):
    pytest.importorskip("retina_core.io.decode")
    import torch

    top = _kermany(tmp_path / "OCT2017 ", splits=("test",), real=True)
    idx = load_dataset(top)
    ds = ImageDataset(idx.records, idx.classes)
    assert len(ds) == 8
    x, y = ds[0]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and tuple(x.shape) == (3, 40, 48)
    assert 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert idx.classes[y] == idx.records[0].label
    x2, _ = ImageDataset(idx.records, idx.classes, size=(4, 6))[1]
    assert tuple(x2.shape) == (3, 4, 6)
    x3, _ = ImageDataset(idx.records, idx.classes, transform=lambda a: a.mean(axis=2, keepdims=True))[2]
    assert isinstance(x3, torch.Tensor) and tuple(x3.shape) == (40, 48, 1)
    with pytest.raises(RetinaInputError, match="not among"):
        ImageDataset(idx.records, ["CNV"])


def test_odir_kaggle_archive_prefers_folder_with_images(tmp_path):
    rows = _odir_rows()
    _write_csv(tmp_path / "full_df.csv", _ODIR_HEADER + ["filename"], [r + ["x.jpg"] for r in rows + rows])
    d = tmp_path / "ODIR-5K" / "ODIR-5K"
    _write_csv(d / "data.csv", _ODIR_HEADER, rows + rows)  # duplicated rows do not duplicate records
    for pid in range(3):
        for side in ("left", "right"):
            _touch(d / "Training Images" / f"{pid}_{side}.jpg")
    idx = load_dataset(tmp_path)
    assert idx.root == d
    _check_odir(idx)


def test_point_at_a_file_and_leak_warning(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    _write_csv(tmp_path / "metadata.csv", ["id", "label", "patient_id", "eye", "split"],
               [["a", "AMD", "p9", "left", "train"]])
    idx = load_dataset(tmp_path / "metadata.csv")
    assert idx.layout == "volumes" and idx.records[0].eye == "OS" and idx.records[0].patient_id == "p9"
    assert idx.records[0].split == "train"
    top = tmp_path / "k" / "OCT2017 "
    for s in ("train", "test"):
        for c in ("CNV", "DME"):
            _touch(top / s / c / f"{c}-42-{len(s)}.jpeg")
    assert any("more than one split" in w for w in load_dataset(top).warnings)


def test_broken_aptos_is_not_mistaken_for_folders(tmp_path):
    _write_csv(tmp_path / "train.csv", ["image", "level"], [["a", 0]])
    _touch(tmp_path / "train_images" / "a.png")
    _touch(tmp_path / "test_images" / "b.png")
    with pytest.raises(RetinaInputError, match="Tried these layouts"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------------- label column
def test_labels_from_another_column_with_a_map(tmp_path):
    for i in range(6):
        _touch(tmp_path / f"img{i}.png", real=True)
    _write_csv(tmp_path / "labels.csv", ["file", "label", "patient_id", "grade"],
               [[f"img{i}.png", "DME" if i % 2 else "noDME", f"p{i}", g]
                for i, g in enumerate(["0", "NPDR", "PDR", "unknown", "0", ""])])
    plain = load_dataset(tmp_path)
    idx = load_dataset(tmp_path, label_column="grade", label_map="0=none, NPDR=DR ,PDR=DR")
    assert plain.classes == ["noDME", "DME"] and len(plain.records) == 6
    assert idx.classes == ["none", "DR"]
    assert {r.path.name: r.label for r in idx.records} == {"img0.png": "none", "img1.png": "DR", "img2.png": "DR",
                                                           "img4.png": "none"}
    assert "2 record(s)" in idx.warnings[-1]
    unmapped = load_dataset(tmp_path, label_column="grade")            # no map: the values themselves, minus unknown
    assert sorted(unmapped.classes) == ["0", "NPDR", "PDR"] and len(unmapped.records) == 4
    for bad in ("0", "=DR", "0=none,"[:-1] + ",x"):
        with pytest.raises(RetinaInputError, match="label-map"):
            load_dataset(tmp_path, label_column="grade", label_map=bad)
    with pytest.raises(RetinaInputError, match="no_such"):
        load_dataset(tmp_path, label_column="no_such", label_map="1=a")


def test_sets_combined_with_their_own_label_maps_then_trained_and_evaluated_per_source(tmp_path):
    """`data combine`: two sets, each through its own label map, as one labels.csv (paths only, a source column);
    `train` reads it, a patient keeps the split it has alone under patient_hash, and `evaluate --by source` gives
    each set's own figures on the same test split."""
    from retina_core.cli import main
    from retina_core.evaluate.run import evaluate
    from retina_core.io.datasets import combine_sets, hash_split
    from retina_core.phantoms import write_dataset
    from retina_core.train.engine import TrainConfig, train

    a, b = tmp_path / "four", tmp_path / "grades"
    write_dataset("fundus-4class", n=24, seed=1, out=a, size=32)
    write_dataset("fundus-dr", n=24, seed=2, out=b, size=32)
    out = tmp_path / "joint"
    assert main(["data", "combine", "--set", str(a), "--label-map", "normal=noDR,diabetic_retinopathy=DR",
                 "--set", str(b), "--label-map", "No DR=noDR,Mild=DR,Moderate=DR,Severe=DR,Proliferative DR=DR",
                 "--out", str(out), "--json"]) == 0
    joint = load_dataset(out)
    alone = {p: load_dataset(p) for p in (a, b)}
    assert {r.meta["source"] for r in joint.records} == {"four", "grades"}
    assert not any(Path(r.path).resolve().is_relative_to(out) for r in joint.records)   # nothing copied
    n_four = sum(r.label in ("normal", "diabetic_retinopathy") for r in alone[a].records)
    assert sum(r.meta["source"] == "four" for r in joint.records) == n_four
    assert {r.label for r in joint.records} == {"noDR", "DR"}
    def splits(index):
        return {str(Path(r.path).resolve()): s for s, rs in hash_split(index.records, seed=0).items() for r in rs
                if r.patient_id}

    split_alone = splits(alone[b])
    assert len(split_alone) == 24 and all(splits(joint)[p] == s for p, s in split_alone.items())   # same split
    with pytest.raises(SystemExit):                                             # a map needs its set
        main(["data", "combine", "--label-map", "x=y", "--out", str(tmp_path / "bad")])
    with pytest.raises(RetinaInputError, match="at least two"):
        combine_sets([{"path": str(a)}], tmp_path / "one")

    run = tmp_path / "run"
    train("fundus_anydr_resnet18_head", out, run, TrainConfig(epochs=1, batch_size=8, image_size=32,
                                                             split_by="patient_hash"))
    manifest = json.loads((run / "manifest.json").read_text())["fundus_anydr_resnet18_head"]
    assert manifest["trained_on_phantoms"] is True and manifest["metric_kind"] == "phantom"   # made of phantom sets
    rep = evaluate("fundus_anydr_resnet18_head", out, weights_dir=run, by="source")
    groups = rep["by"]["groups"]
    assert set(groups) <= {"four", "grades"} and sum(g["n"] for g in groups.values()) == rep["n"]
    for g in groups.values():
        assert "accuracy" in g["metrics"] and "ci95" in g
