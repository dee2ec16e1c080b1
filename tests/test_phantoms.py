"""Synthetic phantom engine: determinism, anatomy, lesion masks, separability and on-disk layouts (seconds)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from retina_core.labels import DR_GRADES, FUNDUS4, OCT4, OCT8
from retina_core.phantoms import (
    KERMANY_ROOT,
    Phantom,
    fundus_phantom,
    oct_phantom,
    oct_volume,
    paired_phantoms,
    write_dataset,
)

FUNDUS_LESION = {"Mild": "microaneurysm", "Moderate": "haemorrhage", "Severe": "haemorrhage",
                 "Proliferative DR": "neovascularisation", "amd": "drusen", "glaucoma": "cup"}
OCT_LESION = {"AMD": "atrophy", "CNV": "cnv", "CSR": "fluid", "DME": "cyst", "DR": "foci", "DRUSEN": "drusen",
              "MH": "hole"}


def _same(a: Phantom, b: Phantom):
    assert np.array_equal(a.image, b.image)
    assert a.masks.keys() == b.masks.keys()
    for k in a.masks:
        assert np.array_equal(a.masks[k], b.masks[k])
    assert a.meta == b.meta


# ------------------------------------------------------------------------------------------------ determinism

def test_fundus_deterministic_and_seed_dependent():
    a, b = fundus_phantom("Moderate", 3, 160), fundus_phantom("Moderate", 3, 160)
    _same(a, b)
    c = fundus_phantom("Moderate", 4, 160)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (160, 160, 3) and a.image.dtype == np.uint8
    assert a.modality == "fundus" and a.label == "Moderate"
    json.dumps(a.meta)


def test_oct_deterministic_and_seed_dependent():
    a, b = oct_phantom("DME", 5, 160, 150), oct_phantom("DME", 5, 160, 150)
    _same(a, b)
    c = oct_phantom("DME", 6, 160, 150)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (150, 160) and a.image.dtype == np.uint8
    assert a.modality == "oct"
    json.dumps(a.meta)


def test_volume_deterministic_3d_consistent():
    a = oct_volume("CSR", 2, n_slices=8, height=48, width=48)
    b = oct_volume("CSR", 2, n_slices=8, height=48, width=48)
    _same(a, b)
    assert a.image.shape == (8, 48, 48) and a.image.dtype == np.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    fluid = a.masks["fluid"]
    assert fluid.shape == a.image.shape
    per_slice = fluid.sum(axis=(1, 2))
    assert per_slice[4] > 0  # fovea in the middle slice (D // 2)
    nz = np.nonzero(per_slice)[0]
    assert np.all(np.diff(nz) == 1)  # the detachment is one contiguous run of slices
    for k in ("age", "sex", "laterality", "va_logmar", "cst_um", "hba1c"):
        assert k in a.meta
    json.dumps(a.meta)


def test_camera_look_independent_of_label():
    # same seed: same field of view / geometry whatever the label (no label shortcut in the camera look)
    a, b = fundus_phantom("No DR", 11, 128), fundus_phantom("Severe", 11, 128)
    assert a.meta["fov_radius"] == b.meta["fov_radius"] and a.meta["disc_xy"] == b.meta["disc_xy"]
    assert np.array_equal(a.image == 0, b.image == 0)
    o1, o2 = oct_phantom("NORMAL", 11, 128, 124), oct_phantom("CNV", 11, 128, 124)
    assert o1.meta["span_mm"] == o2.meta["span_mm"]


# ------------------------------------------------------------------------------------------------ masks

@pytest.mark.parametrize("label", list(FUNDUS_LESION))
def test_fundus_lesion_masks_present(label):
    p = fundus_phantom(label, 1, 192)
    m = p.masks[FUNDUS_LESION[label]]
    assert m.shape == (192, 192) and m.dtype == bool and m.any()


@pytest.mark.parametrize("label", ["No DR", "normal", "cataract"])
def test_fundus_normal_no_masks(label):
    p = fundus_phantom(label, 2, 128)
    assert all(not m.any() for m in p.masks.values())


@pytest.mark.parametrize("label", list(OCT_LESION))
def test_oct_lesion_masks_present(label):
    p = oct_phantom(label, 1, 192, 186)
    m = p.masks[OCT_LESION[label]]
    assert m.shape == (186, 192) and m.dtype == bool and m.any()


def test_oct_normal_no_masks():
    for s in range(3):
        p = oct_phantom("NORMAL", s, 128, 124)
        assert all(not m.any() for m in p.masks.values())


def _ring(mask, fov, exclude, r_in=2, r_out=6):
    ring = ndimage.binary_dilation(mask, iterations=r_out) & ~ndimage.binary_dilation(mask, iterations=r_in)
    return ring & fov & ~exclude


def test_fundus_masks_sit_on_lesions():
    # haemorrhages darker in green, exudates brighter than their surroundings
    diffs_h, diffs_e = [], []
    for s in range(3):
        p = fundus_phantom("Severe", 20 + s, 256)
        img = p.image.astype(np.float32)
        fov = img.sum(-1) > 0
        allm = np.zeros(fov.shape, bool)
        for m in p.masks.values():
            allm |= m
        h = p.masks["haemorrhage"]
        diffs_h.append(img[..., 1][_ring(h, fov, allm)].mean() - img[..., 1][h].mean())
        if "exudate" in p.masks:
            e = p.masks["exudate"]
            lum = img.mean(-1)
            diffs_e.append(lum[e].mean() - lum[_ring(e, fov, allm)].mean())
    assert np.mean(diffs_h) > 8
    assert diffs_e and np.mean(diffs_e) > 15


def test_fundus_microaneurysms_visible_and_drusen_bright():
    p = fundus_phantom("Mild", 7, 512)
    ma = p.masks["microaneurysm"]
    lab, n = ndimage.label(ma)
    sizes = ndimage.sum(ma, lab, range(1, n + 1))
    assert n >= 3 and np.median(sizes) >= 5  # >= 2-3 px across at 512
    g = p.image[..., 1].astype(np.float32)
    fov = p.image.sum(-1) > 0
    assert g[_ring(ma, fov, ma, 2, 4)].mean() - g[ma].mean() > 8
    d = fundus_phantom("amd", 7, 256)
    lum = d.image.astype(np.float32).mean(-1)
    dm = d.masks["drusen"]
    assert lum[dm].mean() > lum[_ring(dm, lum > 0, dm)].mean()


def test_lesion_count_grows_with_grade():
    def load(grade):
        tot, area = [], []
        for s in range(3):
            p = fundus_phantom(DR_GRADES[grade], 100 + s, 192)
            tot.append(sum(p.meta["lesion_counts"].values()))
            area.append(sum(int(m.sum()) for m in p.masks.values()))
        return np.mean(tot), np.mean(area)

    stats = [load(g) for g in range(5)]
    counts = [c for c, _ in stats]
    areas = [a for _, a in stats]
    assert counts[0] == 0
    assert counts[1] < counts[2] < counts[3]
    assert areas[1] < areas[2] < areas[3]
    assert counts[4] > counts[2]
    p4 = fundus_phantom("Proliferative DR", 5, 192)
    assert "neovascularisation" in p4.masks
    p3 = fundus_phantom("Severe", 5, 192)
    assert "neovascularisation" not in p3.masks


def test_fundus_anatomy_metadata():
    for s, lab in enumerate(["No DR", "glaucoma", "Moderate", "amd"]):
        p = fundus_phantom(lab, 40 + s, 224)
        m = p.meta
        cx, cy = m["fov_center"]
        for key in ("disc_xy", "fovea_xy"):
            x, y = m[key]
            assert 0 <= x < 224 and 0 <= y < 224
            assert (x - cx) ** 2 + (y - cy) ** 2 < m["fov_radius"] ** 2
            assert p.image[int(y), int(x)].sum() > 0
        lum = p.image.astype(np.float32).mean(-1)
        yy, xx = np.mgrid[0:224, 0:224]
        dx, dy = m["disc_xy"]
        fx, fy = m["fovea_xy"]
        r = 0.6 * m["disc_radius"]
        disc = lum[(xx - dx) ** 2 + (yy - dy) ** 2 < r * r].mean()
        fov = lum[(xx - fx) ** 2 + (yy - fy) ** 2 < r * r].mean()
        assert disc > fov + 15
        # fovea temporal to the disc: OD -> disc right of the fovea
        assert (dx > fx) == (m["eye"] == "OD")
        dd = 2 * m["disc_radius"]
        assert 2.0 < np.hypot(dx - fx, dy - fy) / dd < 3.3
    g = fundus_phantom("glaucoma", 1, 128)
    assert g.meta["cup_to_disc"] >= 0.6
    assert fundus_phantom("normal", 1, 128).meta["cup_to_disc"] <= 0.4


def test_oct_anatomy_and_dark_lesions():
    p = oct_phantom("NORMAL", 3, 256, 248)
    img = p.image.astype(np.float32)
    j = int(p.meta["fovea_x"])
    ilm, rpe = int(p.meta["ilm_y_fovea"]), int(p.meta["rpe_y_fovea"])
    vitreous = img[: max(ilm - 10, 5), :].mean()
    rpe_band = img[rpe: rpe + 4, max(0, j - 20): j + 20].mean()
    assert rpe_band > vitreous + 80
    # foveal pit: the retina is thinner at the fovea than 1.5 mm away
    assert 150 < p.meta["central_thickness_um"] < 330

    def inside_vs_retina(ph, name):
        im = ph.image.astype(np.float32)
        m = ph.masks[name]
        rows = np.nonzero(m.any(1))[0]
        band = np.zeros_like(m)
        band[rows.min(): rows.max() + 1] = True
        ref = band & ~ndimage.binary_dilation(m, iterations=3) & (im > 0)
        return im[m].mean(), im[ref].mean()

    for lab, name in (("MH", "hole"), ("CSR", "fluid"), ("DME", "cyst")):
        ph = oct_phantom(lab, 4, 256, 248)
        inside, ref = inside_vs_retina(ph, name)
        assert inside < 0.6 * ref, (lab, inside, ref)
    ph = oct_phantom("DR", 4, 256, 248)
    inside, ref = inside_vs_retina(ph, "foci")
    assert inside > ref


def _flat_features(img: np.ndarray) -> np.ndarray:
    """Flatten each column on its brightest row (RPE), crop the retina band, downsample."""
    a = ndimage.gaussian_filter(img.astype(np.float32) / 255, (1.0, 2.0))
    h, w = a.shape
    rpe = ndimage.median_filter(a.argmax(0), 9)
    rows = (rpe[None, :] + np.arange(-56, 12)[:, None]).clip(0, h - 1)
    flat = a[rows, np.arange(w)[None, :]]
    small = np.asarray(Image.fromarray(flat).resize((16, 34), Image.BILINEAR))
    return np.concatenate([small.ravel(), np.sort(small.std(1)), small.std(0)])


@pytest.mark.parametrize("classes,min_acc", [(OCT4, 0.5), (OCT8, 0.3)])
def test_oct_classes_separable(classes, min_acc):
    n = 10
    X, y = [], []
    for ci, c in enumerate(classes):
        for s in range(n):
            X.append(_flat_features(oct_phantom(c, 1000 * ci + s, 128, 124).image))
            y.append(ci)
    X, y = np.array(X), np.array(y)
    tr = np.arange(len(y)) % n < 7
    te = ~tr
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-3
    Z = (X - mu) / sd
    k = len(classes)
    A = Z[tr]
    W = np.linalg.solve(A.T @ A + 30.0 * np.eye(A.shape[1]), A.T @ np.eye(k)[y[tr]])  # ridge one-vs-rest
    acc = ((Z[te] @ W).argmax(1) == y[te]).mean()
    assert acc >= min_acc, acc  # chance is 1/k


def test_paired_same_eye():
    f, o = paired_phantoms(3, fundus_size=128, oct_width=128, oct_height=124, disease=True)
    assert f.modality == "fundus" and o.modality == "oct"
    assert f.label == o.label == "disease"
    for k in ("patient_id", "eye", "age", "sex", "oct_class", "fundus_class"):
        assert f.meta[k] == o.meta[k]
    assert f.masks and o.masks
    f2, o2 = paired_phantoms(3, fundus_size=128, oct_width=128, oct_height=124, disease=False)
    assert f2.label == "normal" and not f2.masks and not o2.masks


# ------------------------------------------------------------------------------------------------ layouts

def _meta_rows(out: Path):
    with open(out / "phantom_meta.csv") as f:
        return list(csv.DictReader(f))


def _check_masks_outside(out: Path, image_rels):
    for rel in image_rels:
        stem = rel[: -len(".nii.gz")] if rel.endswith(".nii.gz") else str(Path(rel).with_suffix(""))
        mdir = out / "masks" / stem
        if mdir.exists():
            for m in mdir.iterdir():
                arr = np.asarray(Image.open(m)) if m.suffix == ".png" else None
                if arr is not None:
                    assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 255}


def test_write_aptos(tmp_path):
    s = write_dataset("fundus-dr", 10, 0, tmp_path, size=96)
    rows = list(csv.reader(open(tmp_path / "train.csv")))
    assert rows[0] == ["id_code", "diagnosis"] and len(rows) == 11
    assert sorted(int(r[1]) for r in rows[1:]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for idc, _ in rows[1:]:
        assert (tmp_path / "train_images" / f"{idc}.png").is_file()
    assert sorted(p.name for p in (tmp_path / "train_images").iterdir()) == sorted(f"{r[0]}.png" for r in rows[1:])
    meta = _meta_rows(tmp_path)
    assert len(meta) == 10
    _check_masks_outside(tmp_path, [r["path"] for r in meta])
    assert any((tmp_path / "masks" / "train_images").iterdir())
    assert s["n"] == 10


def test_write_fundus4_kaggle_and_ieee(tmp_path):
    write_dataset("fundus-4class", 8, 1, tmp_path / "k", size=96)
    root = tmp_path / "k" / "dataset"
    assert sorted(p.name for p in root.iterdir()) == sorted(FUNDUS4)
    for c in FUNDUS4:
        files = list((root / c).iterdir())
        assert len(files) == 2 and all(f.is_file() for f in files)
        for f in files:
            assert f.suffix in (".jpg", ".jpeg") and (f.stem.endswith("_left") or f.stem.endswith("_right"))
    write_dataset("fundus-4class", 24, 1, tmp_path / "i", layout="ieee", size=96)
    i = tmp_path / "i"
    assert json.loads((i / "cat_to_name.json").read_text()) == {"1": "cataract", "2": "diabetic_retinopathy",
                                                                "3": "glaucoma", "4": "normal"}
    for split in ("train_dir", "valid_dir", "test_dir"):
        assert (i / split).is_dir()
        for d in (i / split).iterdir():
            assert d.name in {"1", "2", "3", "4"}
            assert all(f.suffix == ".jpg" and f.is_file() for f in d.iterdir())
    assert {d.name for d in (i / "train_dir").iterdir()} == {"1", "2", "3", "4"}


def test_write_kermany_trailing_space(tmp_path):
    s = write_dataset("oct-kermany", 24, 2, tmp_path, size=64)
    root = tmp_path / "OCT2017 "
    assert KERMANY_ROOT == "OCT2017 " and root.is_dir()
    assert {p.name for p in tmp_path.iterdir()} == {"OCT2017 ", "masks", "phantom_meta.csv"}
    patient_split = {}
    n = 0
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(OCT4)
        for c in OCT4:
            for f in (root / split / c).iterdir():
                assert f.suffix == ".jpeg" and f.is_file()
                cls, pid, k = f.stem.split("-")
                assert cls == c and pid.isdigit() and k.isdigit()
                assert patient_split.setdefault(pid, split) == split  # a patient's images stay in one split
                n += 1
    assert n == 24 and s["n"] == 24
    assert len(patient_split) < 24  # several images per patient
    assert (tmp_path / "masks" / "OCT2017 ").is_dir()


def test_write_kermany_real_sizes(tmp_path):
    write_dataset("oct-kermany", 4, 3, tmp_path)
    sizes = {Image.open(tmp_path / r["path"]).size for r in _meta_rows(tmp_path)}
    assert sizes <= {(512, 496), (768, 496), (512, 512), (1024, 496), (1536, 496)}


def test_write_c8_volume_paired(tmp_path):
    write_dataset("oct-c8", 16, 4, tmp_path / "c8", size=64)
    root = tmp_path / "c8" / "RetinalOCT_Dataset" / "RetinalOCT_Dataset"
    names = set()
    for split in root.iterdir():
        assert split.name in ("train", "val", "test")
        for c in split.iterdir():
            assert c.name in OCT8
            names.add(c.name)
            assert all(f.suffix == ".jpg" for f in c.iterdir())
    assert names == set(OCT8)

    import nibabel as nib
    write_dataset("oct-volume", 2, 5, tmp_path / "v", size=32)
    rows = list(csv.DictReader(open(tmp_path / "v" / "metadata.csv")))
    assert len(rows) == 2 and {r["label"] for r in rows} == {"normal", "disease"}
    for k in ("id", "file", "age", "sex", "laterality", "label"):
        assert k in rows[0]
    vol = np.asarray(nib.load(str(tmp_path / "v" / rows[0]["file"])).dataobj)
    assert vol.shape == (32, 32, 32) and vol.dtype == np.float32

    write_dataset("paired", 4, 6, tmp_path / "p", size=64)
    pr = list(csv.DictReader(open(tmp_path / "p" / "pairs.csv")))
    assert list(pr[0].keys()) == ["patient_id", "fundus", "oct", "label"]
    for r in pr:
        assert (tmp_path / "p" / r["fundus"]).is_file() and (tmp_path / "p" / r["oct"]).is_file()
    meta = _meta_rows(tmp_path / "p")
    assert len(meta) == 8
    for col in ("path", "label", "patient_id", "eye", "age", "sex", "seed", "fovea_x", "disc_x"):
        assert col in meta[0]
