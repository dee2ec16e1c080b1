"""Write phantom data sets in the real on-disk layouts (APTOS, Kaggle/IEEE 4-class, Kermany, OCT-C8, NIfTI volumes,
fundus+OCT pairs). Masks go to `out/masks/<image path relative to out, without extension>/<lesion>.png`, never into
class folders; `out/phantom_meta.csv` lists every image with its label, patient and geometry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..labels import DR_GRADES, FUNDUS4, OCT4, OCT8
from ..modality import Modality
from ._common import Phantom, sample_patient, streams
from .fundus import fundus_phantom
from .oct import C8_SIZES, KERMANY_SIZES, oct_phantom
from .volume import oct_volume, paired_phantoms

KINDS = ("fundus-dr", "fundus-4class", "oct-kermany", "oct-c8", "oct-volume", "paired")
LAYOUTS = {
    "fundus-dr": ("aptos",),
    "fundus-4class": ("kaggle", "ieee"),
    "oct-kermany": ("kaggle", "mendeley"),
    "oct-c8": ("c8",),
    "oct-volume": ("nifti",),
    "paired": ("pairs",),
}
KERMANY_ROOT = "OCT2017 "  # Kaggle's top folder name ends in a space
IEEE_CAT_TO_NAME = {"1": "cataract", "2": "diabetic_retinopathy", "3": "glaucoma", "4": "normal"}
META_COLUMNS = ["path", "label", "patient_id", "eye", "age", "sex", "seed", "patient_seed", "modality", "width",
                "height", "fovea_x", "fovea_y", "disc_x", "disc_y", "disc_radius", "dr_grade", "oct_class", "masks"]


def _img_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([abs(int(seed)), int(i), 7]).generate_state(1)[0])


def _balanced(n: int, classes) -> list:
    """n items spread as evenly as possible over classes (first classes get the remainder)."""
    n = max(int(n), 0)
    k = len(classes)
    return [classes[j] for j in range(k) for _ in range(n // k + (1 if j < n % k else 0))]


def _split_patients(groups: list[list], splits=("train", "val", "test"), fracs=(0.7, 0.15, 0.15)) -> dict:
    """Assign whole patients (lists of items) to splits; every split gets >= 1 patient when there are enough."""
    out = {s: [] for s in splits}
    total = sum(len(g) for g in groups)
    if len(groups) < len(splits):  # too few patients: keep them for training
        out[splits[0]] = [x for g in groups for x in g]
        return out
    order = list(groups)
    small = list(splits[1:])[::-1]  # fill test first, then val, rest train
    fr = dict(zip(splits, fracs))
    i = 0
    for s in small:
        if len(order) - i <= 1:
            break
        want = max(1, int(round(fr[s] * total)))
        got = 0
        while i < len(order) - 1 and got < want and len(order) - i > len(small):
            out[s].extend(order[i])
            got += len(order[i])
            i += 1
    for g in order[i:]:
        out[splits[0]].extend(g)
    return out


class _Writer:
    def __init__(self, out: Path):
        self.out = out
        self.rows: list[dict] = []

    def save(self, ph: Phantom, rel: str, fmt: str | None = None, quality: int = 92):
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if ph.modality == Modality.OCT_VOLUME:
            import nibabel as nib
            aff = np.diag([ph.meta.get("slice_spacing_mm", 1.0), ph.meta.get("axial_um_per_px", 1.0) / 1000.0,
                           ph.meta.get("span_mm", 6.0) / ph.image.shape[2], 1.0])
            nib.save(nib.Nifti1Image(ph.image.astype(np.float32), aff), str(path))
        else:
            im = Image.fromarray(ph.image)
            ext = path.suffix.lower()
            if ext in (".jpg", ".jpeg"):
                im.save(path, format="JPEG", quality=quality)
            else:
                im.save(path, format="PNG")
        stem = rel[: -len(".nii.gz")] if rel.endswith(".nii.gz") else str(Path(rel).with_suffix(""))
        for name, m in ph.masks.items():
            mp = self.out / "masks" / stem / (f"{name}.nii.gz" if ph.modality == Modality.OCT_VOLUME else f"{name}.png")
            mp.parent.mkdir(parents=True, exist_ok=True)
            arr = m.astype(np.uint8) * 255
            if ph.modality == Modality.OCT_VOLUME:
                import nibabel as nib
                nib.save(nib.Nifti1Image(arr, np.eye(4)), str(mp))
            else:
                Image.fromarray(arr).save(mp, format="PNG")
        m = ph.meta
        shp = ph.image.shape
        row = {"path": rel, "label": ph.label, "patient_id": m.get("patient_id"), "eye": m.get("eye"),
               "age": m.get("age"), "sex": m.get("sex"), "seed": m.get("seed"),
               "patient_seed": m.get("patient_seed"), "modality": ph.modality,
               "width": shp[-1] if ph.modality != Modality.FUNDUS else shp[1],
               "height": shp[-2] if ph.modality != Modality.FUNDUS else shp[0],
               "dr_grade": m.get("dr_grade", ""), "oct_class": m.get("oct_class", ""),
               "masks": ";".join(sorted(ph.masks))}
        if ph.modality == Modality.FUNDUS:
            row.update({"fovea_x": round(m["fovea_xy"][0], 1), "fovea_y": round(m["fovea_xy"][1], 1),
                        "disc_x": round(m["disc_xy"][0], 1), "disc_y": round(m["disc_xy"][1], 1),
                        "disc_radius": round(m["disc_radius"], 1)})
        else:
            row.update({"fovea_x": round(m.get("fovea_x", 0.0), 1), "fovea_y": "", "disc_x": "", "disc_y": "",
                        "disc_radius": ""})
        self.rows.append(row)

    def finish(self):
        with open(self.out / "phantom_meta.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=META_COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in META_COLUMNS})


def _count(counts: dict, *keys):
    d = counts
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = d.get(keys[-1], 0) + 1


def write_dataset(kind: str, n: int, seed: int, out, layout: str | None = None, size: int | None = None) -> dict:
    """Write n phantoms (total, balanced over classes) of one kind in its real on-disk layout under out.

    kinds/layouts: fundus-dr (aptos), fundus-4class (kaggle | ieee), oct-kermany (kaggle | mendeley), oct-c8,
    oct-volume (nifti), paired. size: fundus side (default 512); OCT width=height=size (default: a real size drawn per
    image, independent of the label); volume H=W=size (default 128, 32 slices). Returns a summary dict.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    layout = layout or LAYOUTS[kind][0]
    if layout not in LAYOUTS[kind]:
        raise ValueError(f"layout {layout!r} not available for {kind}; expected one of {LAYOUTS[kind]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wr = _Writer(out)
    rng, r_size, r_pat = streams(seed, 3, tag=51)
    counts: dict = {}
    fsize = int(size) if size else 512

    if kind == "fundus-dr":
        labels = _balanced(n, list(range(len(DR_GRADES))))
        rng.shuffle(labels)
        rows = []
        for i, g in enumerate(labels):
            idc = "".join(f"{int(b):02x}" for b in rng.integers(0, 256, 6))
            ph = fundus_phantom(DR_GRADES[g], _img_seed(seed, i), fsize)
            wr.save(ph, f"train_images/{idc}.png")
            rows.append((idc, g))
            _count(counts, DR_GRADES[g])
        with open(out / "train.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id_code", "diagnosis"])
            w.writerows(rows)

    elif kind == "fundus-4class":
        labels = _balanced(n, list(FUNDUS4))
        per = {c: labels.count(c) for c in FUNDUS4}
        i = 0
        for c in FUNDUS4:
            k = per[c]
            items = []  # one group of (pid, eye, patient) per patient
            got = 0
            while got < k:
                pat = sample_patient(r_pat, "normal")
                pid = int(rng.integers(0, 5000))
                both = rng.random() < 0.5 and k - got >= 2
                eyes = ["OS", "OD"] if both else [("OS", "OD")[int(rng.integers(2))]]
                items.append([(pid, e, pat) for e in eyes])
                got += len(eyes)
            if layout == "ieee":
                parts = _split_patients(items, ("train_dir", "valid_dir", "test_dir"), (0.7, 0.15, 0.15))
            else:
                parts = {"": [x for g in items for x in g]}
            for split, lst in parts.items():
                for pid, e, pat in lst:
                    side = "left" if e == "OS" else "right"
                    ph = fundus_phantom(c, _img_seed(seed, i), fsize,
                                        patient={**pat, "patient_id": str(pid), "eye": e})
                    i += 1
                    if layout == "ieee":
                        num = {v: k_ for k_, v in IEEE_CAT_TO_NAME.items()}[c]
                        rel = f"{split}/{num}/{pid}_{side}.jpg"
                        _count(counts, split, c)
                    else:
                        ext = ".jpeg" if rng.random() < 0.3 else ".jpg"
                        rel = f"dataset/{c}/{pid}_{side}{ext}"
                        _count(counts, c)
                    if (out / rel).exists():  # same pid drawn twice in a class: keep names unique
                        rel = rel.replace(f"{pid}_", f"{pid}_{i}_", 1)
                    wr.save(ph, rel, quality=90)
        if layout == "ieee":
            (out / "cat_to_name.json").write_text(json.dumps(IEEE_CAT_TO_NAME, indent=1))

    elif kind in ("oct-kermany", "oct-c8"):
        classes = list(OCT4) if kind == "oct-kermany" else list(OCT8)
        labels = _balanced(n, classes)
        per = {c: labels.count(c) for c in classes}
        if kind == "oct-kermany":
            root = KERMANY_ROOT if layout == "kaggle" else "OCT2017"
            splits = ("train", "val", "test") if layout == "kaggle" else ("train", "test")
            fracs = (0.7, 0.15, 0.15) if layout == "kaggle" else (0.85, 0.15)
            sizes = KERMANY_SIZES
        else:
            root = "RetinalOCT_Dataset/RetinalOCT_Dataset"
            splits, fracs, sizes = ("train", "val", "test"), (0.7, 0.15, 0.15), C8_SIZES
        i = 0
        used_pids = set()
        for c in classes:
            k = per[c]
            groups = []
            left = k
            max_per = 1 if kind == "oct-c8" else max(1, min(4, k // 3))
            while left > 0:
                m = int(min(left, rng.integers(1, max_per + 1)))
                pid = int(rng.integers(1_000_000, 9_999_999))
                while pid in used_pids:
                    pid += 1
                used_pids.add(pid)
                groups.append([(pid, j + 1) for j in range(m)])
                left -= m
            parts = _split_patients(groups, splits, fracs)
            for split, lst in parts.items():
                for pid, j in lst:
                    if size:
                        w, h = int(size), int(size)
                    else:
                        w, h = sizes[int(r_size.integers(len(sizes)))]
                    pseed = _img_seed(seed, 10_000_000 + pid)
                    ph = oct_phantom(c, _img_seed(seed, i), w, h, patient_seed=pseed,
                                     patient={"patient_id": str(pid)})
                    if kind == "oct-kermany":
                        rel = f"{root}/{split}/{c}/{c}-{pid}-{j}.jpeg"
                    else:
                        rel = f"{root}/{split}/{c}/{c.lower()}_{split}_{i + 1:05d}.jpg"
                    wr.save(ph, rel)
                    _count(counts, split, c)
                    i += 1

    elif kind == "oct-volume":
        labels = _balanced(n, ["normal", "disease"])
        rng.shuffle(labels)
        side = int(size) if size else 128
        rows = []
        for i, lab in enumerate(labels):
            vid = f"vol_{i:05d}"
            ph = oct_volume(lab, _img_seed(seed, i), n_slices=32, height=side, width=side)
            rel = f"volumes/{vid}.nii.gz"
            wr.save(ph, rel)
            m = ph.meta
            rows.append({"id": vid, "file": rel, "age": m["age"], "sex": m["sex"], "laterality": m["laterality"],
                         "va_logmar": m["va_logmar"], "cst_um": m["cst_um"], "hba1c": m["hba1c"], "label": lab})
            _count(counts, lab)
        with open(out / "metadata.csv", "w", newline="") as f:
            # no oct_class here: it would leak the label into the metadata branch (it is in phantom_meta.csv)
            w = csv.DictWriter(f, fieldnames=["id", "file", "age", "sex", "laterality", "va_logmar", "cst_um",
                                              "hba1c", "label"])
            w.writeheader()
            w.writerows(rows)

    elif kind == "paired":
        labels = _balanced(n, [False, True])
        rng.shuffle(labels)
        rows = []
        for i, dis in enumerate(labels):
            ow, oh = (int(size), int(size)) if size else KERMANY_SIZES[int(r_size.integers(len(KERMANY_SIZES)))]
            f, o = paired_phantoms(_img_seed(seed, i), fundus_size=fsize, oct_width=ow, oct_height=oh, disease=dis)
            pid = f.meta["patient_id"]
            base = pid
            k = 1
            while (out / f"fundus/{base}.png").exists():
                base = f"{pid}_{k}"
                k += 1
            wr.save(f, f"fundus/{base}.png")
            wr.save(o, f"oct/{base}.png")
            rows.append([base, f"fundus/{base}.png", f"oct/{base}.png", f.label])
            _count(counts, f.label)
        with open(out / "pairs.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "fundus", "oct", "label"])
            w.writerows(rows)

    wr.finish()
    return {"kind": kind, "layout": layout, "out": str(out), "n": len(wr.rows), "counts": counts,
            "meta_csv": str(out / "phantom_meta.csv")}
