"""Adapters that load real retinal data sets exactly as users have them on disk.

    >>> idx = load_dataset("~/data/OCT2017 ")          # layout detected automatically
    >>> idx.layout, idx.classes, idx.counts()
    ('kermany', ['CNV', 'DME', 'DRUSEN', 'NORMAL'], {'train': {...}, 'val': {...}, 'test': {...}})
    >>> splits = patient_split(idx.records)            # stratified, no patient in two splits
    >>> ds = ImageDataset(splits["train"], idx.classes)

Layouts (``detect_layout`` tries them in this order, the specific ones before the generic "folders"):

- ``labels``   ``labels.csv`` (file, label, optionally patient_id, eye, split, other columns; or file +
  ``mask_<lesion>`` columns for a lesion set such as IDRiD), the layout of ``../shared/realdata/*``
- ``kermany``  ``OCT2017 /{train,val,test}/{CNV,DME,DRUSEN,NORMAL}/CLASS-<patient>-<n>.jpeg`` (also the Mendeley
  original ``OCT2017`` or ``CellData/OCT`` with train/test only)
- ``octc8``    ``RetinalOCT_Dataset/RetinalOCT_Dataset/{train,val,test}/{AMD,CNV,CSR,DME,DR,DRUSEN,MH,NORMAL}/``
- ``ieee4``    ``{train_dir,valid_dir,test_dir}/{1,2,3,4}/`` + ``cat_to_name.json``
- ``kaggle4``  ``dataset/{cataract,diabetic_retinopathy,glaucoma,normal}/`` (``1234_left.jpg`` -> patient 1234, OS)
- ``aptos``    ``train.csv`` (id_code, diagnosis) + ``train_images/<id_code>.png``
- ``odir``     a sheet (.xlsx or .csv) with ID, Patient Age, Patient Sex, Left-Fundus, Right-Fundus, N..O
  + ``Training Images/``
- ``volumes``  NIfTI files + ``metadata.csv`` (id/file column, label column, other metadata)
- ``paired``   ``pairs.csv`` (patient_id, fundus, oct, label) with paths relative to the csv
- ``folders``  ``<root>/<class>/*`` or ``<root>/{train,val,test}/<class>/*``

Everywhere: a ``masks/`` directory, ``phantom_meta.csv``, hidden files, ``.DS_Store`` and ``Thumbs.db`` are
ignored; image extensions are case-insensitive. A ``phantom_meta.csv`` at the root (written by the phantom
generators) fills patient id, eye, age and sex into the records.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from ..errors import RetinaInputError
from ..labels import DME2, DR_GRADES, FUNDUS4, OCT4, OCT8
from ..modality import Modality

if TYPE_CHECKING:
    import numpy as np

try:  # torch is a hard dependency of the package, but keep `data inspect` usable without it
    import torch
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is always installed in the project venv
    torch = None
    _TorchDataset = object

__all__ = [
    "Record", "DatasetIndex", "LAYOUTS", "IMAGE_EXTENSIONS", "detect_layout", "load_dataset", "patient_split",
    "inspect_dataset", "ImageDataset", "record_lesion_masks", "hash_split", "pair_records", "write_pairs",
    "relabel", "parse_label_map",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm"})
VOLUME_SUFFIXES = (".nii", ".nii.gz")
SPLITS = ("train", "val", "test")
_IGNORED_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "phantom_meta.csv"})
_IGNORED_DIRS = frozenset({"masks", "__macosx"})
_SPLIT_ALIASES = {
    "train": "train", "training": "train", "train_dir": "train", "train_set": "train", "trainset": "train",
    "val": "val", "valid": "val", "validation": "val", "valid_dir": "val", "val_dir": "val", "dev": "val",
    "test": "test", "testing": "test", "test_dir": "test", "test_set": "test", "testset": "test",
}
_KERMANY_NAME = re.compile(r"^([A-Za-z]+)-(\d+)-(\d+)$")
_EYE_NAME = re.compile(r"^(?P<pid>.+?)[_\-\s]+(?P<eye>left|right|os|od)$", re.IGNORECASE)
_ODIR_FLAGS = ("N", "D", "G", "C", "A", "H", "M", "O")
_NO_SPLIT = "unsplit"  # counts() key for records without a split


# --------------------------------------------------------------------------------------------- data classes
@dataclass
class Record:
    """One labelled sample: an image (or volume, or fundus of a fundus/OCT pair) and what is known about it."""

    path: Path
    label: str
    split: str | None = None
    patient_id: str | None = None
    eye: str | None = None                      # "OD" (right) / "OS" (left) / None
    meta: dict = field(default_factory=dict)    # age, sex, ODIR flags, volume metadata, pair partner path, ...


@dataclass
class DatasetIndex:
    """A data set as found on disk: its layout, root, class names (in model order) and records."""

    layout: str
    root: Path
    classes: list[str]
    records: list[Record]
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        """``{split: {class: n}}``; records without a split are counted under ``"unsplit"``."""
        out: dict[str, dict[str, int]] = {}
        for split in _split_order(r.split for r in self.records):
            out[split] = {c: 0 for c in self.classes}
        for r in self.records:
            row = out[r.split or _NO_SPLIT]
            row[r.label] = row.get(r.label, 0) + 1
        return out

    @property
    def splits(self) -> list[str]:
        return [s for s in _split_order(r.split for r in self.records) if s != _NO_SPLIT]


def _split_order(splits: Iterable[str | None]) -> list[str]:
    present = {s or _NO_SPLIT for s in splits}
    known = [s for s in (*SPLITS, _NO_SPLIT) if s in present]
    return known + sorted(present - set(known))


# --------------------------------------------------------------------------------------------- file helpers
def _ignored(p: Path) -> bool:
    name = p.name
    return name.startswith(".") or name.lower() in _IGNORED_NAMES or name.lower() in _IGNORED_DIRS


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not _ignored(p)


def _is_volume(p: Path) -> bool:
    n = p.name.lower()
    return n.endswith(VOLUME_SUFFIXES) and not _ignored(p)


def _volume_stem(name: str) -> str:
    low = name.lower()
    for suf in (".nii.gz", ".nii"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def _subdirs(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if p.is_dir() and not _ignored(p))
    except OSError:
        return []


def _files(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if p.is_file() and not _ignored(p))
    except OSError:
        return []


def _walk_files(d: Path, keep: Callable[[Path], bool] = _is_image) -> list[Path]:
    """Files below ``d`` (recursive), skipping hidden entries, masks/ and phantom_meta.csv."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = sorted(n for n in dirnames if not _ignored(Path(n)))
        for n in sorted(filenames):
            p = Path(dirpath) / n
            if keep(p):
                out.append(p)
    return out


def _split_name(name: str) -> str | None:
    return _SPLIT_ALIASES.get(name.strip().lower())


def _split_dirs(d: Path) -> dict[str, Path]:
    """Sub-folders of ``d`` that are split folders (train/val/test and their usual spellings)."""
    out = {}
    for sd in _subdirs(d):
        s = _split_name(sd.name)
        if s and s not in out:
            out[s] = sd
    return out


def _has_image(d: Path) -> bool:
    """Whether any image lies below ``d`` (stops at the first one: cheap on 100k-image trees)."""
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = [n for n in dirnames if not _ignored(Path(n))]
        if any(_is_image(Path(n)) for n in filenames):
            return True
    return False


def _class_dirs(d: Path) -> list[Path]:
    """Sub-folders of ``d`` that hold at least one image (directly or below)."""
    return [sd for sd in _subdirs(d) if _split_name(sd.name) is None and _has_image(sd)]


def _candidates(path: Path, extra: Sequence[str] = (), depth: int = 3) -> list[Path]:
    """``path`` plus the folders a user may have pointed *above* the real root: named wrappers (``extra``,
    relative paths) and chains of single sub-folders (what unzipping usually produces)."""
    out = [path]
    for rel in extra:
        p = path / rel
        if p.is_dir():
            out.append(p)
    cur = path
    for _ in range(depth):
        subs = _subdirs(cur)
        if len(subs) != 1 or any(_is_image(f) for f in _files(cur)):
            break
        cur = subs[0]
        out.append(cur)
    seen, uniq = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def _parse_eye(value) -> str | None:
    if value is None:
        return None
    v = str(value).strip().lower()
    if v in ("od", "r", "right", "re", "right eye"):
        return "OD"
    if v in ("os", "l", "left", "le", "left eye"):
        return "OS"
    return None


def _parse_name(stem: str) -> tuple[str | None, str | None]:
    """Patient id and eye from a file stem: ``CNV-1016042-1`` -> (1016042, None); ``1234_left`` -> (1234, OS)."""
    m = _KERMANY_NAME.match(stem)
    if m:
        return m.group(2), None
    m = _EYE_NAME.match(stem)
    if m:
        return m.group("pid"), _parse_eye(m.group("eye"))
    return None, None


def _number(v):
    """CSV value -> int/float where it is a number, None where empty, else the stripped string."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        if isinstance(v, float) and math.isnan(v):
            return None
        return int(v) if isinstance(v, float) and v.is_integer() else v
    s = str(v).strip()
    if s == "" or s.lower() in ("nan", "na", "n/a", "none", "null"):
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
        return f if math.isfinite(f) else s
    except ValueError:
        return s


def _label_str(v) -> str:
    v = _number(v)
    return "" if v is None else str(v)


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RetinaInputError(f"Could not read {path}: {e}. Expected a comma-separated text file with a header row.")
    return [{(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()} for row in rows]


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [h.strip() for h in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _find_col(columns: Iterable[str], *names: str) -> str | None:
    norm = {re.sub(r"[\s_\-]+", "", c.lower()): c for c in columns}
    for n in names:
        c = norm.get(re.sub(r"[\s_\-]+", "", n.lower()))
        if c is not None:
            return c
    return None


def _ordered_classes(labels: Iterable[str], canonical: Sequence[str] = ()) -> list[str]:
    present = set(labels)
    return [c for c in canonical if c in present] + sorted(present - set(canonical))


# --------------------------------------------------------------------------------------------- layout probes
# Each probe returns the layout root for `path` (which may be the root itself or a folder above it) or None.
def _kermany_tree(d: Path) -> bool:
    splits = _split_dirs(d)
    if "train" not in splits and "test" not in splits:
        return False
    names = {c.name for s in splits.values() for c in _class_dirs(s)}
    return bool(names) and names <= set(OCT4)


def _probe_kermany(path: Path) -> Path | None:
    for c in _candidates(path, ("OCT2017 ", "OCT2017", "CellData/OCT", "ZhangLabData/CellData/OCT", "OCT")):
        if _kermany_tree(c):
            return c
    return None


def _octc8_tree(d: Path) -> bool:
    splits = _split_dirs(d)
    if not splits:
        return False
    names = {c.name for s in splits.values() for c in _class_dirs(s)}
    if not names or not names <= set(OCT8):
        return False
    return not names <= set(OCT4) or d.name.startswith("RetinalOCT")


def _probe_octc8(path: Path) -> Path | None:
    for c in _candidates(path, ("RetinalOCT_Dataset/RetinalOCT_Dataset", "RetinalOCT_Dataset")):
        if _octc8_tree(c):
            return c
    return None


def _probe_ieee4(path: Path) -> Path | None:
    for c in _candidates(path):
        dirs = {sd.name.lower() for sd in _subdirs(c)}
        if dirs & {"train_dir", "valid_dir", "test_dir"}:
            for sd in _subdirs(c):
                if sd.name.lower() in ("train_dir", "valid_dir", "test_dir") and any(
                        x.name.isdigit() for x in _subdirs(sd)):
                    return c
        if (c / "cat_to_name.json").is_file() and any(
                x.name.isdigit() for s in _split_dirs(c).values() for x in _subdirs(s)):
            return c
    return None


def _fundus4_name(name: str) -> str | None:
    n = re.sub(r"[\s\-]+", "_", name.strip().lower())
    if n in FUNDUS4:
        return n
    aliases = {"dr": "diabetic_retinopathy", "diabetic": "diabetic_retinopathy", "retinopathy": "diabetic_retinopathy",
               "normal_fundus": "normal", "healthy": "normal", "cataracts": "cataract"}
    if n in aliases:
        return aliases[n]
    for c in FUNDUS4:
        first = n.split("_")[0]
        if n.startswith(c) or (len(first) >= 4 and c.startswith(first)):
            return c
    return None


def _kaggle4_tree(d: Path) -> bool:
    roots = list(_split_dirs(d).values()) or [d]
    names = [c.name for r in roots for c in _class_dirs(r)]
    return len(set(names)) >= 2 and all(n.lower() in FUNDUS4 for n in names)


def _probe_kaggle4(path: Path) -> Path | None:
    for c in _candidates(path, ("dataset",)):
        if _kaggle4_tree(c):
            return c
    return None


def _probe_aptos(path: Path) -> Path | None:
    if path.is_file() and path.suffix.lower() == ".csv":
        path = path.parent
    for c in _candidates(path, ("aptos2019-blindness-detection",)):
        f = c / "train.csv"
        if f.is_file() and {"id_code", "diagnosis"} <= set(_csv_header(f)):
            return c
    return None


def _odir_sheets(d: Path) -> list[Path]:
    return [f for f in _files(d) if f.suffix.lower() in (".xlsx", ".xls", ".csv")]


def _odir_header_ok(cols: Iterable[str]) -> bool:
    cols = list(cols)
    return all(_find_col(cols, n) for n in ("ID", "Left-Fundus", "Right-Fundus")) and sum(
        c.strip() in _ODIR_FLAGS for c in cols) >= 2


_ODIR_IMAGE_DIRS = ("Training Images", "training images", "Training_Images", "training_images")


def _odir_image_dir(d: Path) -> Path | None:
    return next((d / n for n in _ODIR_IMAGE_DIRS if (d / n).is_dir()), None)


def _probe_odir(path: Path) -> Path | None:
    if path.is_file():
        path = path.parent
    sheet_only = None  # a sheet without its image folder: still ODIR, loading then says what is missing
    for c in _candidates(path, ("ODIR-5K/ODIR-5K", "ODIR-5K")):
        for f in _odir_sheets(c):
            csv_ok = f.suffix.lower() == ".csv" and _odir_header_ok(_csv_header(f))
            is_sheet = csv_ok or f.suffix.lower() in (".xlsx", ".xls")  # xlsx headers need openpyxl: trust the name
            if is_sheet and _odir_image_dir(c) is not None:
                return c
            if csv_ok and sheet_only is None:
                sheet_only = c
    return sheet_only


def _labels_csv_ok(d: Path) -> bool:
    cols = _csv_header(d / "labels.csv") if (d / "labels.csv").is_file() else []
    return bool(_find_col(cols, "file", "path", "filename")) and (
        bool(_find_col(cols, "label")) or any(c.lower().startswith("mask_") for c in cols))


def _probe_labels(path: Path) -> Path | None:
    if path.is_file() and path.name.lower() == "labels.csv":
        path = path.parent
    for c in _candidates(path):
        if _labels_csv_ok(c):
            return c
    return None


def _probe_volumes(path: Path) -> Path | None:
    for c in _candidates(path):
        if (c / "metadata.csv").is_file() and _walk_files(c, _is_volume):
            return c
    return None


def _probe_paired(path: Path) -> Path | None:
    if path.is_file() and path.name.lower() == "pairs.csv":
        path = path.parent
    for c in _candidates(path):
        if (c / "pairs.csv").is_file():
            return c
    return None


def _folders_tree(d: Path) -> bool:
    splits = _split_dirs(d)
    roots = list(splits.values()) or [d]
    names = {c.name for r in roots for c in _class_dirs(r)}
    if any(n.lower().endswith("images") for n in names):  # e.g. train_images/ of a broken APTOS or ODIR folder
        return False
    return len(names) >= 2 or (bool(splits) and len(names) >= 1)


def _probe_folders(path: Path) -> Path | None:
    for c in _candidates(path):
        if _folders_tree(c):
            return c
    return None


LAYOUTS: dict[str, tuple[Callable[[Path], Path | None], str]] = {
    "labels": (_probe_labels, "labels.csv with columns file,label (paths relative to the csv) and optionally "
                              "patient_id, eye, split and other columns; or file + mask_<lesion> columns (a lesion "
                              "set such as IDRiD's segmentation part)"),
    "kermany": (_probe_kermany, "OCT2017 /{train,val,test}/{CNV,DME,DRUSEN,NORMAL}/CLASS-patient-n.jpeg "
                                "(or the Mendeley original OCT2017 or CellData/OCT with train/test only)"),
    "octc8": (_probe_octc8, "RetinalOCT_Dataset/RetinalOCT_Dataset/{train,val,test}/"
                            "{AMD,CNV,CSR,DME,DR,DRUSEN,MH,NORMAL}/"),
    "ieee4": (_probe_ieee4, "{train_dir,valid_dir,test_dir}/{1,2,3,4}/ plus cat_to_name.json"),
    "kaggle4": (_probe_kaggle4, "dataset/{cataract,diabetic_retinopathy,glaucoma,normal}/ with image files"),
    "aptos": (_probe_aptos, "train.csv with columns id_code,diagnosis plus train_images/<id_code>.png"),
    "odir": (_probe_odir, "a sheet (.xlsx or .csv) with ID, Patient Age, Patient Sex, Left-Fundus, Right-Fundus, "
                          "N,D,G,C,A,H,M,O plus a 'Training Images/' folder"),
    "volumes": (_probe_volumes, "NIfTI files (*.nii, *.nii.gz) plus metadata.csv with a file/id column and a "
                                "label column"),
    "paired": (_probe_paired, "pairs.csv with columns patient_id,fundus,oct,label (paths relative to the csv)"),
    "folders": (_probe_folders, "<root>/<class>/<images> or <root>/{train,val,test}/<class>/<images>, "
                                "at least two class folders"),
}


def _expectations(names: Iterable[str] | None = None) -> str:
    return "\n".join(f"  - {n}: {LAYOUTS[n][1]}" for n in (names or LAYOUTS))


def _as_path(path) -> Path:
    if path is None or str(path) == "":
        raise RetinaInputError("No data set path was given. Expected a folder holding a retinal data set.")
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise RetinaInputError(f"Data set path {str(p)!r} does not exist. Expected a folder holding a retinal "
                               f"data set (check the spelling; Kaggle's 'OCT2017 ' folder ends with a space).")
    return p


def _probe(name: str, path: Path) -> Path | None:
    probe = LAYOUTS[name][0]
    root = probe(path)
    if root is None and path.is_file():  # pointed at train.csv, metadata.csv, data.xlsx, an image ...
        root = probe(path.parent)
    return root


def _detect(path: Path) -> tuple[str, Path]:
    for name in LAYOUTS:
        root = _probe(name, path)
        if root is not None:
            return name, root
    raise RetinaInputError(
        f"Could not recognise the data set layout of {str(path)!r}. Tried these layouts, expecting:\n"
        f"{_expectations()}\nImage extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}. "
        f"Point at the data set folder or pass the layout explicitly.")


def detect_layout(path) -> str:
    """Name of the layout of the data set at ``path`` (one of ``LAYOUTS``); RetinaInputError if none fits."""
    return _detect(_as_path(path))[0]


# --------------------------------------------------------------------------------------------- loaders
def _load_split_class_tree(root: Path, rename: Callable[[str], str | None] = lambda n: n,
                           warnings: list[str] | None = None) -> list[Record]:
    """Records of ``root/[split/]class/**/image``; patient/eye parsed from the file names."""
    splits = _split_dirs(root)
    roots = [(s, d) for s, d in splits.items()] or [(None, root)]
    records = []
    for split, sroot in roots:
        for cdir in _class_dirs(sroot):
            label = rename(cdir.name)
            if label is None:
                if warnings is not None:
                    warnings.append(f"Folder {cdir} is not a known class; skipped.")
                continue
            for f in _walk_files(cdir):
                pid, eye = _parse_name(f.stem)
                records.append(Record(path=f, label=label, split=split, patient_id=pid, eye=eye))
    if splits and warnings is not None:
        loose = [f for f in _files(root) if _is_image(f)]
        if loose:
            warnings.append(f"{len(loose)} image(s) directly in {root} are outside any class folder; ignored.")
    return records


def _load_kermany(root: Path, w: list[str]) -> tuple[list[Record], list[str]]:
    recs = _load_split_class_tree(root, warnings=w)
    for r in recs:
        if r.patient_id is None:
            w.append(f"{r.path.name}: expected CLASS-patient-n.jpeg; patient id unknown.")
        elif r.path.name.split("-")[0] != r.label:
            w.append(f"{r.path.name} lies in folder {r.label} but its name says {r.path.name.split('-')[0]}.")
    return recs, _ordered_classes((r.label for r in recs), OCT4)


def _load_octc8(root: Path, w: list[str]) -> tuple[list[Record], list[str]]:
    recs = _load_split_class_tree(root, warnings=w)
    return recs, _ordered_classes((r.label for r in recs), OCT8)


def _load_kaggle4(root: Path, w: list[str]) -> tuple[list[Record], list[str]]:
    recs = _load_split_class_tree(root, rename=lambda n: n.lower(), warnings=w)
    return recs, _ordered_classes((r.label for r in recs), FUNDUS4)


def _load_ieee4(root: Path, w: list[str]) -> tuple[list[Record], list[str]]:
    f = root / "cat_to_name.json"
    if not f.is_file():
        raise RetinaInputError(f"{root} looks like the IEEE DataPort 4-class layout but has no cat_to_name.json. "
                               f"Expected cat_to_name.json mapping the folder numbers to names, e.g. "
                               f'{{"1": "cataract", "2": "diabetic_retinopathy", "3": "glaucoma", "4": "normal"}}.')
    try:
        mapping = json.loads(f.read_text(encoding="utf-8-sig"))
        if not isinstance(mapping, dict):
            raise ValueError("not an object")
    except (ValueError, OSError) as e:
        raise RetinaInputError(f"{f} is not a valid JSON object ({e}). Expected a mapping like "
                               f'{{"1": "cataract", "2": "diabetic_retinopathy", ...}}.') from None
    names = {}
    for k, v in mapping.items():
        n = _fundus4_name(str(v))
        if n is None:
            n = re.sub(r"[\s\-]+", "_", str(v).strip().lower())
            w.append(f"cat_to_name.json: {v!r} is not one of {', '.join(FUNDUS4)}; kept as {n!r}.")
        names[str(k).strip()] = n

    def rename(folder: str) -> str | None:
        return names.get(folder.strip())

    recs = _load_split_class_tree(root, rename=rename, warnings=w)
    return recs, _ordered_classes((r.label for r in recs), FUNDUS4)


def _image_lookup(d: Path) -> dict[str, Path]:
    """stem (lower case) and file name (lower case) -> path, for the images below ``d``."""
    out = {}
    for f in _walk_files(d):
        out.setdefault(f.name.lower(), f)
        out.setdefault(f.stem.lower(), f)
    return out


def _load_aptos(root: Path, w: list[str]) -> tuple[list[Record], list[str]]:
    sources = [("train.csv", ("train_images",), "train")]
    extra = [(n, (d, n[:-4] + "_images"), "val") for n, d in (("valid.csv", "val_images"), ("val.csv", "val_images"))]
    extra += [("test.csv", ("test_images",), "test")]
    labelled = [s for s in sources + extra if (root / s[0]).is_file() and "diagnosis" in _csv_header(root / s[0])]
    use_splits = len(labelled) > 1
    recs = []
    for csv_name, img_dirs, split in labelled:
        img_dir = next((root / d for d in img_dirs if (root / d).is_dir()), None)
        if img_dir is None:
            w.append(f"{csv_name}: folder {img_dirs[0]}/ not found; its images are missing.")
            lookup = {}
        else:
            lookup = _image_lookup(img_dir)
        missing = []
        for i, row in enumerate(_read_csv(root / csv_name), start=2):
            idc, dx = (row.get("id_code") or "").strip(), _number(row.get("diagnosis"))
            if not idc:
                w.append(f"{csv_name} line {i}: empty id_code; skipped.")
                continue
            if not isinstance(dx, int) or not 0 <= dx < len(DR_GRADES):
                raise RetinaInputError(f"{root / csv_name} line {i}: diagnosis {row.get('diagnosis')!r} for "
                                       f"{idc}. Expected an integer ICDR grade 0-4 "
                                       f"({', '.join(f'{k}={g}' for k, g in enumerate(DR_GRADES))}).")
            f = lookup.get(f"{idc.lower()}.png") or lookup.get(idc.lower())
            if f is None:
                missing.append(idc)
                continue
            recs.append(Record(path=f, label=DR_GRADES[dx], split=split if use_splits else None,
                               meta={"id_code": idc, "diagnosis": dx}))
        if missing:
            w.append(f"{csv_name}: {len(missing)} image file(s) listed but not found in {img_dirs[0]}/ "
                     f"(e.g. {', '.join(missing[:5])}); skipped.")
    return recs, _ordered_classes((r.label for r in recs), DR_GRADES)


def _read_sheet(f: Path) -> list[dict]:
    if f.suffix.lower() == ".csv":
        return _read_csv(f)
    try:
        import pandas as pd
        df = pd.read_excel(f)
    except ImportError as e:
        raise RetinaInputError(f"Reading {f.name} needs the 'openpyxl' package ({e}). Install it "
                               f"(pip install openpyxl) or save the sheet as CSV next to it.") from None
    except Exception as e:  # noqa: BLE001 - any parser error is the user's file
        raise RetinaInputError(f"Could not read the sheet {f}: {e}. Expected an ODIR-5K annotation sheet.") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df.to_dict(orient="records")


def _load_odir(root: Path, w: list[str]) -> tuple[list[Record], list[str]]:
    sheet, rows = None, None
    sheets = sorted(_odir_sheets(root), key=lambda f: (f.suffix.lower() != ".csv", f.name))
    for f in sheets:
        if f.suffix.lower() == ".csv" and not _odir_header_ok(_csv_header(f)):
            continue
        data = _read_sheet(f)
        if data and _odir_header_ok(data[0].keys()):
            sheet, rows = f, data
            break
    if sheet is None:
        raise RetinaInputError(f"No ODIR annotation sheet found in {root}. Expected a .xlsx or .csv sheet with "
                               f"columns ID, Patient Age, Patient Sex, Left-Fundus, Right-Fundus, N,D,G,C,A,H,M,O.")
    cols = list(rows[0].keys())
    c_id, c_age, c_sex = _find_col(cols, "ID"), _find_col(cols, "Patient Age", "Age"), _find_col(cols, "Patient Sex",
                                                                                                 "Sex")
    c_lf, c_rf = _find_col(cols, "Left-Fundus"), _find_col(cols, "Right-Fundus")
    c_lk = _find_col(cols, "Left-Diagnostic Keywords")
    c_rk = _find_col(cols, "Right-Diagnostic Keywords")
    flags = [c for c in cols if c.strip() in _ODIR_FLAGS]
    img_dir = _odir_image_dir(root)
    if img_dir is None:
        raise RetinaInputError(f"{root} has the ODIR sheet {sheet.name} but no 'Training Images/' folder. "
                               f"Expected the fundus images in '{root / 'Training Images'}'.")
    lookup = _image_lookup(img_dir)
    recs, missing, unlabelled, seen = [], [], 0, set()
    for row in rows:
        pid = _number(row.get(c_id))
        if pid is None:
            continue
        pos = [c.strip() for c in flags if _number(row.get(c)) == 1]
        if not pos:
            unlabelled += 1
            continue
        label = pos[0] if len(pos) == 1 else "multi"
        base = {"age": _number(row.get(c_age)) if c_age else None, "sex": row.get(c_sex) if c_sex else None,
                "flags": {c.strip(): int(_number(row.get(c)) == 1) for c in flags}}
        for col, kw, eye in ((c_lf, c_lk, "OS"), (c_rf, c_rk, "OD")):
            name = str(row.get(col) or "").strip()
            if not name:
                continue
            f = lookup.get(name.lower()) or lookup.get(Path(name).stem.lower())
            if f is None:
                missing.append(name)
                continue
            if f in seen:  # per-image sheets (e.g. Kaggle's full_df.csv) repeat each patient row
                continue
            seen.add(f)
            meta = dict(base, flags=dict(base["flags"]))
            if kw and row.get(kw):
                meta["keywords"] = str(row.get(kw))
            recs.append(Record(path=f, label=label, split=None, patient_id=str(pid), eye=eye, meta=meta))
    if missing:
        w.append(f"{sheet.name}: {len(missing)} image(s) listed but not found in {img_dir.name}/ "
                 f"(e.g. {', '.join(missing[:5])}); skipped.")
    if unlabelled:
        w.append(f"{sheet.name}: {unlabelled} row(s) have none of the flags {','.join(_ODIR_FLAGS)} set; skipped.")
    return recs, _ordered_classes((r.label for r in recs), (*_ODIR_FLAGS, "multi"))


def _load_volumes(root: Path, w: list[str]) -> tuple[list[Record], list[str]]:
    rows = _read_csv(root / "metadata.csv")
    if not rows:
        raise RetinaInputError(f"{root / 'metadata.csv'} is empty. Expected one row per volume with a file/id "
                               f"column and a label column.")
    cols = list(rows[0].keys())
    vols = _walk_files(root, _is_volume)
    by_key: dict[str, Path] = {}
    for v in vols:
        for key in (v.name, _volume_stem(v.name), str(v.relative_to(root)).replace(os.sep, "/")):
            by_key.setdefault(key.lower(), v)
    # the id column is the one whose values name the most volume files
    best, best_hits = None, 0
    for c in cols:
        hits = sum(1 for r in rows if str(r.get(c) or "").strip().lower() in by_key)
        if hits > best_hits:
            best, best_hits = c, hits
    c_label = _find_col(cols, "label", "class", "diagnosis", "target", "y", "grade")
    if best is None or c_label is None:
        raise RetinaInputError(
            f"{root / 'metadata.csv'} has columns {cols}. Expected a column naming the NIfTI files (e.g. 'file' or "
            f"'id', values like {', '.join(v.name for v in vols[:2])}) and a 'label' column.")
    c_pid = _find_col(cols, "patient_id", "patient", "subject_id", "subject")
    c_eye = _find_col(cols, "eye", "laterality", "side")
    c_split = _find_col(cols, "split", "fold_name", "set")
    skip = {best, c_label, c_pid, c_eye, c_split}
    recs, missing, used = [], [], set()
    for r in rows:
        key = str(r.get(best) or "").strip()
        v = by_key.get(key.lower())
        if v is None:
            missing.append(key)
            continue
        used.add(v)
        label = _label_str(r.get(c_label))
        if not label:
            w.append(f"metadata.csv: {key} has no label; skipped.")
            continue
        meta = {c: _number(r.get(c)) for c in cols if c not in skip}
        meta["id"] = key
        pid = _label_str(r.get(c_pid)) if c_pid else ""
        split = _split_name(str(r.get(c_split) or "")) if c_split else None
        recs.append(Record(path=v, label=label, split=split, patient_id=pid or _volume_stem(v.name),
                           eye=_parse_eye(r.get(c_eye)) if c_eye else None, meta=meta))
    if missing:
        w.append(f"metadata.csv: {len(missing)} volume(s) listed but not found (e.g. {', '.join(missing[:5])}); "
                 f"skipped.")
    extra = [v for v in vols if v not in used]
    if extra:
        w.append(f"{len(extra)} NIfTI file(s) have no row in metadata.csv (e.g. {extra[0].name}); ignored.")
    if recs and any(r.split for r in recs) and not all(r.split for r in recs):
        w.append("metadata.csv: only some rows have a split; splits will be recomputed by patient_split.")
    return recs, _ordered_classes(r.label for r in recs)


def _load_paired(root: Path, w: list[str]) -> tuple[list[Record], list[str]]:
    rows = _read_csv(root / "pairs.csv")
    cols = list(rows[0].keys()) if rows else _csv_header(root / "pairs.csv")
    c_f, c_o, c_l = _find_col(cols, "fundus"), _find_col(cols, "oct"), _find_col(cols, "label")
    if not (c_f and c_o and c_l):
        raise RetinaInputError(f"{root / 'pairs.csv'} has columns {cols}. Expected patient_id, fundus, oct, label "
                               f"(fundus and oct are image paths relative to pairs.csv).")
    c_pid = _find_col(cols, "patient_id", "patient")
    c_eye, c_split = _find_col(cols, "eye", "laterality"), _find_col(cols, "split")
    skip = {c_f, c_o, c_l, c_pid, c_eye, c_split}
    recs, missing = [], []
    for i, r in enumerate(rows, start=2):
        fp, op = root / str(r.get(c_f) or "").strip(), root / str(r.get(c_o) or "").strip()
        bad = [str(p) for p in (fp, op) if not p.is_file()]
        if bad:
            missing.extend(bad)
            continue
        label = _label_str(r.get(c_l))
        if not label:
            w.append(f"pairs.csv line {i}: no label; skipped.")
            continue
        meta = {c: _number(r.get(c)) for c in cols if c not in skip}
        meta.update({"fundus": str(fp), "oct": str(op), "partner": str(op), "modality": Modality.FUNDUS})
        recs.append(Record(path=fp, label=label, split=_split_name(str(r.get(c_split) or "")) if c_split else None,
                           patient_id=_label_str(r.get(c_pid)) or None if c_pid else None,
                           eye=_parse_eye(r.get(c_eye)) if c_eye else None, meta=meta))
    if missing:
        w.append(f"pairs.csv: {len(missing)} file(s) not found (e.g. {', '.join(missing[:3])}); those pairs skipped.")
    return recs, _ordered_classes(r.label for r in recs)


LESION_SET_LABEL = "lesions"   # the label of a lesion set's images (labels.csv without a label column)


def _load_labels(root: Path, w: list[str]) -> tuple[list[Record], list[str]]:
    """``labels.csv`` (file, label[, patient_id, eye, split, ...]); a row's ``mask_<lesion>`` columns become
    ``meta["masks"][<lesion>]`` (absolute paths). Without a patient id column the id and eye are parsed from the
    file name (``1034_left.jpg`` -> patient 1034, OS), so both eyes of one person stay in one split."""
    rows = _read_csv(root / "labels.csv")
    cols = list(rows[0].keys()) if rows else _csv_header(root / "labels.csv")
    c_file, c_label = _find_col(cols, "file", "path", "filename"), _find_col(cols, "label")
    c_pid, c_eye = _find_col(cols, "patient_id", "patient"), _find_col(cols, "eye", "laterality")
    c_split = _find_col(cols, "split")
    mask_cols = [c for c in cols if c.lower().startswith("mask_")]
    skip = {c_file, c_label, c_pid, c_eye, c_split, *mask_cols}
    recs, missing = [], []
    for i, r in enumerate(rows, start=2):
        rel = str(r.get(c_file) or "").strip()
        f = root / rel
        if not rel or not f.is_file():
            missing.append(rel or f"line {i}")
            continue
        label = _label_str(r.get(c_label)) if c_label else LESION_SET_LABEL
        if not label:
            w.append(f"labels.csv line {i}: no label; skipped.")
            continue
        pid, eye = _parse_name(f.stem)
        if c_pid and _label_str(r.get(c_pid)):
            pid = _label_str(r.get(c_pid))
        if c_eye:
            eye = _parse_eye(r.get(c_eye)) or eye
        meta = {c: _number(r.get(c)) for c in cols if c not in skip}
        masks = {c[len("mask_"):]: str(root / str(r[c]).strip()) for c in mask_cols if str(r.get(c) or "").strip()}
        if masks:
            meta["masks"] = masks
        recs.append(Record(path=f, label=label, split=_split_name(str(r.get(c_split) or "")) if c_split else None,
                           patient_id=pid, eye=eye, meta=meta))
    if missing:
        w.append(f"labels.csv: {len(missing)} file(s) not found (e.g. {', '.join(missing[:3])}); skipped.")
    known = next((c for c in (OCT8, OCT4, FUNDUS4, DR_GRADES, DME2) if {r.label for r in recs} <= set(c)), ())
    return recs, _ordered_classes((r.label for r in recs), known)


def _load_folders(root: Path, w: list[str]) -> tuple[list[Record], list[str]]:
    recs = _load_split_class_tree(root, warnings=w)
    known = next((c for c in (OCT8, OCT4, FUNDUS4, DR_GRADES) if {r.label for r in recs} <= set(c)), ())
    return recs, _ordered_classes((r.label for r in recs), known)


_LOADERS = {"labels": _load_labels, "kermany": _load_kermany, "octc8": _load_octc8, "ieee4": _load_ieee4, "kaggle4": _load_kaggle4,
            "aptos": _load_aptos, "odir": _load_odir, "volumes": _load_volumes, "paired": _load_paired,
            "folders": _load_folders}


def _apply_phantom_meta(records: list[Record], dirs: Sequence[Path], w: list[str]) -> None:
    """Fill patient_id/eye/age/sex (and other columns) from a phantom_meta.csv at the root (or the user's path)."""
    for d in dirs:
        f = d / "phantom_meta.csv"
        if f.is_file():
            break
    else:
        return
    rows = _read_csv(f)
    if not rows:
        return
    c_path = _find_col(rows[0].keys(), "path", "file", "filename")
    if c_path is None:
        w.append(f"{f}: no 'path' column; ignored.")
        return
    by_path = {}
    for r in rows:
        rel = str(r.get(c_path) or "").strip()
        if rel:
            by_path[os.path.normcase(os.path.realpath(f.parent / rel))] = r
    mismatched = 0
    for rec in records:
        r = by_path.get(os.path.normcase(os.path.realpath(rec.path)))
        if r is None:
            continue
        for k, v in r.items():
            if k in (c_path, None):
                continue
            kl = k.strip().lower()
            if kl == "label":
                if v and str(v) != rec.label:
                    mismatched += 1
            elif kl in ("patient_id", "patient"):
                if v:
                    rec.patient_id = str(v)
            elif kl in ("eye", "laterality"):
                rec.eye = _parse_eye(v) or rec.eye
            elif kl == "split":
                rec.split = rec.split or _split_name(str(v or ""))
            else:
                nv = _number(v)
                if nv is not None:
                    rec.meta[k] = nv
    if mismatched:
        w.append(f"{f.name}: {mismatched} record(s) have a label that differs from their folder/sheet label.")


def load_dataset(path, layout: str | None = None, label_column: str | None = None,
                 label_map: str | dict | None = None) -> DatasetIndex:
    """Index the data set at ``path``; the layout is detected unless given. Raises RetinaInputError with what was
    expected when the folder does not fit. ``label_column`` / ``label_map``: read the labels from another column of
    the set's labels.csv (`relabel`), e.g. the Mexico fundus set's ``dr_grade`` with ``"0=noDR,NPDR=DR,PDR=DR"``."""
    if label_column or label_map:
        return relabel(load_dataset(path, layout), label_column or "label", label_map)
    p = _as_path(path)
    if layout is None:
        layout, root = _detect(p)
    else:
        if layout not in LAYOUTS:
            raise RetinaInputError(f"Unknown layout {layout!r}. Expected one of: {', '.join(LAYOUTS)}.")
        root = _probe(layout, p)
        if root is None:
            raise RetinaInputError(f"{str(p)!r} does not look like the {layout!r} layout. Expected:\n"
                                   f"{_expectations([layout])}")
    warnings: list[str] = []
    records, classes = _LOADERS[layout](root, warnings)
    if not records:
        raise RetinaInputError(f"No usable images found in {str(root)!r} (layout {layout!r}). Expected:\n"
                               f"{_expectations([layout])}" + (f"\nNotes: {'; '.join(warnings[:5])}" if warnings
                                                               else ""))
    top = (p if p.is_dir() else p.parent).resolve()
    dirs = [root]
    for d in root.resolve().parents:  # phantom_meta.csv may sit in the folder the user pointed at, above the root
        if d != top and top not in d.parents:
            break
        dirs.append(d)
    _apply_phantom_meta(records, dirs, warnings)
    split_of: dict[str, set] = defaultdict(set)
    for r in records:
        if r.split and r.patient_id:
            split_of[r.patient_id].add(r.split)
    leaked = sorted(pid for pid, ss in split_of.items() if len(ss) > 1)
    if leaked:
        warnings.append(f"{len(leaked)} patient(s) have images in more than one split on disk (e.g. "
                        f"{', '.join(leaked[:5])}); use patient_split(..., force=True) for a leak-free split.")
    records.sort(key=lambda r: (SPLITS.index(r.split) if r.split in SPLITS else 9, str(r.path)))
    if len(warnings) > 50:
        warnings = warnings[:50] + [f"... and {len(warnings) - 50} more warnings."]
    return DatasetIndex(layout=layout, root=root, classes=list(classes), records=records, warnings=warnings)


def parse_label_map(spec: str | dict | None) -> dict[str, str] | None:
    """``"0=noDR,NPDR=DR,PDR=DR"`` (or a dict) -> ``{"0": "noDR", "NPDR": "DR", "PDR": "DR"}``; None stays None."""
    if spec is None or isinstance(spec, dict):
        return None if spec is None else {str(k): str(v) for k, v in spec.items()}
    out = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise RetinaInputError(f"--label-map {spec!r}: expected comma-separated value=label pairs, e.g. "
                                   f"'0=noDR,NPDR=DR,PDR=DR'.")
        out[key.strip()] = value.strip()
    if not out:
        raise RetinaInputError("--label-map is empty: give value=label pairs, e.g. '0=noDR,NPDR=DR,PDR=DR'.")
    return out


def relabel(index: DatasetIndex, column: str, label_map: str | dict | None = None) -> DatasetIndex:
    """The set with each record's label taken from ``column`` (the label itself, or another column of labels.csv,
    kept in ``meta``), mapped through ``label_map`` ("value=label,..."). Records whose value is empty, "unknown" or
    not named by the map are left out, so a column graded on part of a set gives a smaller, fully labelled set.
    Training records the column and map in the manifest, and `evaluate` reads the same view back."""
    mapping = parse_label_map(label_map)
    records, values = [], set()
    for r in index.records:
        v = r.label if column == "label" else r.meta.get(column)
        v = "" if v is None else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
        values.add(v)
        label = mapping.get(v) if mapping is not None else (v if v.lower() not in ("", "unknown", "nan") else None)
        if label is not None:
            records.append(replace(r, label=label, meta={**r.meta, "label_from": f"{column}={v}"}))
    if not records:
        seen = ", ".join(sorted(values)[:12]) or "none"
        raise RetinaInputError(f"No record of {index.root} has a usable value in column {column!r} "
                               f"(values found: {seen}); check --label-column and --label-map.")
    classes = _ordered_classes({r.label for r in records}, list(dict.fromkeys((mapping or {}).values())))
    left = len(index.records) - len(records)
    warnings = list(index.warnings) + ([f"{left} record(s) without a mapped {column!r} value left out."]
                                       if left else [])
    return DatasetIndex(layout=index.layout, root=index.root, classes=classes, records=records, warnings=warnings)


# --------------------------------------------------------------------------------------------- splitting
def _group_key(r: Record) -> str:
    return f"p:{r.patient_id}" if r.patient_id not in (None, "") else f"f:{r.path}"


def patient_split(records: Sequence[Record], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                  force: bool = False) -> dict[str, list[Record]]:
    """Split records into train/val/test so that no patient is in two splits, stratified by label.

    If every record already has a split (e.g. Kermany's train/val/test folders) and ``force`` is False, the existing
    splits are kept and the records are only grouped. Otherwise patients (records without a patient id count as
    their own patient) are assigned per class, by their most common label, to the split with the largest shortfall
    of images; each split with a non-zero fraction gets at least one patient of each class when the class has enough
    patients. Deterministic for a given seed; returns copies with ``split`` set, input records are not changed.
    """
    records = list(records)
    if not force and records and all(r.split for r in records):
        out: dict[str, list[Record]] = {s: [] for s in _split_order(r.split for r in records)}
        for r in records:
            out[r.split].append(r)
        return out
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 or not math.isfinite(f) for f in fr) or not math.isclose(sum(fr), 1.0,
                                                                                           abs_tol=1e-6):
        raise RetinaInputError(f"Split fractions {tuple(fractions)} are invalid. Expected three non-negative numbers "
                               f"(train, val, test) that add up to 1, e.g. (0.8, 0.1, 0.1).")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[_group_key(r)].append(i)
    by_label: dict[str, list[str]] = defaultdict(list)
    for key, idx in groups.items():
        cnt = Counter(records[i].label for i in idx)
        top = max(cnt.values())
        by_label[min(lab for lab, n in cnt.items() if n == top)].append(key)
    rng = random.Random(seed)
    assign: dict[str, str] = {}
    active = [s for s, f in zip(SPLITS, fr) if f > 0]
    for label in sorted(by_label):
        keys = sorted(by_label[label])
        rng.shuffle(keys)
        total = sum(len(groups[k]) for k in keys)
        target = {s: f * total for s, f in zip(SPLITS, fr)}
        current = {s: 0 for s in SPLITS}
        rest = list(keys)
        if len(keys) >= len(active):  # one patient per small split first, so every split sees every class
            for s in sorted((s for s in active if s != "train"), key=lambda s: target[s]):
                pick = next((k for k in rest if len(groups[k]) <= max(1.0, target[s])),
                            min(rest, key=lambda k: len(groups[k])))
                rest.remove(pick)
                assign[pick] = s
                current[s] += len(groups[pick])
        for k in rest:
            s = max(active, key=lambda s: (target[s] - current[s], -SPLITS.index(s)))
            assign[k] = s
            current[s] += len(groups[k])
    out = {s: [] for s in SPLITS}
    for key, idx in groups.items():
        for i in idx:
            out[assign[key]].append(i)
    return {s: [replace(records[i], split=s, meta=dict(records[i].meta)) for i in sorted(idx)]
            for s, idx in out.items()}


def hash_split(records: Sequence[Record], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
               ) -> dict[str, list[Record]]:
    """Patient-level split by a keyed hash of each patient id: a patient's split depends only on (seed, id), so
    two sets of the same patients (the Mexico fundus and OCT sets) split alike and a fundus + OCT pair's test
    patients are unseen by both single-modality models. Not stratified (use it where patients are many);
    records without a patient id count as their own patient. Returns copies with ``split`` set."""
    import hashlib

    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise RetinaInputError(f"Split fractions {tuple(fractions)} are invalid. Expected three non-negative "
                               f"numbers (train, val, test) that add up to 1.")
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for r in records:
        u = int.from_bytes(hashlib.sha256(f"{seed}:{_group_key(r)}".encode()).digest()[:8], "big") / 2.0 ** 64
        s = "train" if u < fr[0] else "val" if u < fr[0] + fr[1] else "test"
        out[s].append(replace(r, split=s, meta=dict(r.meta)))
    return out


# --------------------------------------------------------------------------------------------- inspection
def inspect_dataset(path) -> dict:
    """JSON-ready summary: layout, root, classes, splits, counts, n_images, n_patients, eyes, warnings."""
    idx = load_dataset(path)
    pids = {r.patient_id for r in idx.records if r.patient_id}
    eyes = Counter(r.eye for r in idx.records if r.eye)
    warnings = list(idx.warnings)
    if not idx.splits:
        warnings.append("No train/val/test split on disk; patient_split() will make a patient-level split.")
    if not pids:
        warnings.append("No patient ids found; each image is treated as its own patient when splitting.")
    return {
        "layout": idx.layout,
        "root": str(idx.root),
        "classes": list(idx.classes),
        "splits": idx.splits,
        "counts": idx.counts(),
        "n_images": len(idx.records),
        "n_patients": len(pids) if pids else None,
        "eyes": {k: eyes[k] for k in ("OD", "OS") if eyes[k]},
        "warnings": warnings,
    }


# --------------------------------------------------------------------------------------------- torch dataset
class ImageDataset(_TorchDataset):
    """``(tensor, label_index)`` per record, decoded with the one safe decoder ``retina_core.io.decode.read_image``.

    ``transform`` receives the decoded numpy array (uint8 ``[H, W, 3]``; float32 ``[D, H, W]`` for volumes) and
    returns a tensor (or array); without one an image becomes a float32 ``[3, H, W]`` tensor in [0, 1] and a volume
    ``[1, D, H, W]``, resized to ``size`` ((H, W) or (D, H, W)) when given.
    """

    def __init__(self, records: Sequence[Record], classes: Sequence[str], transform: Callable | None = None,
                 size: tuple[int, int] | None = None):
        self.records = list(records)
        self.classes = list(classes)
        self.transform = transform
        self.size = size
        self._index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({r.label for r in self.records} - set(self._index))
        if unknown:
            raise RetinaInputError(f"Labels {unknown} are not among the model classes {self.classes}. "
                                   f"Expected records whose labels are in the class list.")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def targets(self) -> list[int]:
        return [self._index[r.label] for r in self.records]

    def __getitem__(self, i: int):
        from .decode import read_image  # lazy: the decoder module is optional at import time
        import numpy as np

        rec = self.records[i]
        img = read_image(rec.path)
        pixels = np.ascontiguousarray(img.pixels)
        if not pixels.flags.writeable:  # the decoder may hand out read-only arrays; torch wants writable memory
            pixels = pixels.copy()
        if self.transform is not None:
            x = self.transform(pixels)
            if not isinstance(x, torch.Tensor):
                x = torch.as_tensor(np.ascontiguousarray(x))
        elif getattr(img, "kind", "image") == "volume":  # float32 [D, H, W] in [0, 1] -> [1, D, H, W]
            x = torch.from_numpy(pixels).float()[None]
            if self.size is not None and tuple(x.shape[-len(self.size):]) != tuple(self.size):
                mode = "trilinear" if len(self.size) == 3 else "bilinear"
                x = torch.nn.functional.interpolate(x[None], size=tuple(self.size), mode=mode,
                                                    align_corners=False)[0]
        else:  # uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]
            x = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
            if self.size is not None and tuple(x.shape[-2:]) != tuple(self.size):
                x = torch.nn.functional.interpolate(x[None], size=tuple(self.size), mode="bilinear",
                                                    align_corners=False, antialias=True)[0]
        return x, self._index[rec.label]


# ------------------------------------------------------------------------------------------------ lesion masks
def lesion_mask_dir(root: str | Path, path: str | Path) -> tuple[Path | None, str | None]:
    """Where the lesion masks of image `path` live: ``masks/<image path relative to the data root, without
    extension>/*.png`` under `root` or a folder above it (the phantom generators' layout; annotated real sets such as
    IDRiD or FGADR can be arranged the same way), and the image's path relative to that folder."""
    root, path = Path(root), Path(path)
    for base in (root, *root.parents):
        try:
            rel = path.relative_to(base)
        except ValueError:
            continue
        d = base / "masks" / rel.with_suffix("")
        if d.is_dir() or (base / "phantom_meta.csv").exists():
            return d, rel.as_posix()
    return None, None


def record_lesion_masks(rec: Record, shape: tuple[int, int] | None = None,
                        kinds: Iterable[str] | None = None) -> dict[str, "np.ndarray"]:
    """A lesion-set record's masks (``meta["masks"]``, e.g. IDRiD's MA/HE/EX/SE/OD) as bool arrays, each resized
    (nearest) to ``shape`` (H, W) when given; ``kinds`` keeps only those lesion codes."""
    import numpy as np
    from PIL import Image

    out = {}
    for kind, path in (rec.meta.get("masks") or {}).items():
        if kinds is not None and kind not in kinds:
            continue
        with Image.open(path) as im:
            m = im.convert("L")
            if shape is not None and m.size != (shape[1], shape[0]):
                m = m.resize((shape[1], shape[0]), Image.NEAREST)
            out[kind] = np.asarray(m) > 127
    return out


def pair_records(fundus: Sequence[Record], oct_: Sequence[Record]) -> list[dict]:
    """True fundus + OCT pairs of the same eye: records joined on (patient_id, eye) with the same label. Within an
    eye the i-th photograph goes with the i-th B-scan (cycling over the shorter list), so every image is used.
    Returns rows ``{patient_id, eye, label, fundus, oct}`` (paths as Path); eyes whose labels differ are skipped."""
    def by_eye(recs):
        d: dict[tuple, list[Record]] = defaultdict(list)
        for r in recs:
            if r.patient_id and r.eye:
                d[(r.patient_id, r.eye)].append(r)
        return d

    f_eyes, o_eyes = by_eye(fundus), by_eye(oct_)
    rows = []
    for key in sorted(set(f_eyes) & set(o_eyes)):
        fs, os_ = sorted(f_eyes[key], key=lambda r: str(r.path)), sorted(o_eyes[key], key=lambda r: str(r.path))
        labels = {r.label for r in fs} | {r.label for r in os_}
        if len(labels) != 1:
            continue
        label = labels.pop()
        for i in range(max(len(fs), len(os_))):
            rows.append({"patient_id": key[0], "eye": key[1], "label": label,
                         "fundus": fs[i % len(fs)].path, "oct": os_[i % len(os_)].path})
    return rows


def write_pairs(fundus_data, oct_data, out) -> dict:
    """Write ``<out>/pairs.csv`` (the ``paired`` layout) joining two labelled sets by patient and eye (e.g. the
    Mexico fundus and OCT sets). Only paths are written (relative to ``out``): no image is copied."""
    f_idx, o_idx = load_dataset(fundus_data), load_dataset(oct_data)
    rows = pair_records(f_idx.records, o_idx.records)
    if not rows:
        raise RetinaInputError(f"No eye appears in both {str(fundus_data)!r} and {str(oct_data)!r} with the same "
                               f"label. Expected two labelled sets with patient_id and eye columns.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pairs.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["patient_id", "eye", "fundus", "oct", "label"])
        for r in rows:
            wr.writerow([r["patient_id"], r["eye"], os.path.relpath(r["fundus"], out), os.path.relpath(r["oct"], out),
                         r["label"]])
    eyes = {(r["patient_id"], r["eye"]) for r in rows}
    return {"out": str(out / "pairs.csv"), "pairs": len(rows), "eyes": len(eyes),
            "patients": len({p for p, _ in eyes}), "labels": dict(Counter(r["label"] for r in rows))}


COMBINED_FILE = "combined.json"


def combine_sets(sets: Sequence[dict], out) -> dict:
    """Write ``<out>/labels.csv``: the records of several labelled sets as one set, each set's labels taken through
    its own ``label_column`` / ``label_map`` (`relabel`), e.g. the Mexico set's ``dr_grade`` and the 4-class set's
    ``normal`` / ``diabetic_retinopathy`` both as noDR / DR. Only paths are written (relative to ``out``), no image
    is copied. Columns: file, label, patient_id (each set's own, so ``--split-by patient_hash`` puts a patient in
    the split it has in single-set runs with the same seed and fractions), eye, source (the set's folder name; a
    record's set for per-source figures) and source_label (the original value). ``<out>/combined.json`` records
    the inputs. sets: [{"path", "label_column" (optional), "label_map" (optional)}]."""
    if len(sets) < 2:
        raise RetinaInputError("data combine needs at least two sets (--set PATH, repeated).")
    out = Path(out)
    rows, per = [], []
    for spec in sets:
        column, mapping = spec.get("label_column"), spec.get("label_map")
        index = load_dataset(spec["path"], label_column=column, label_map=mapping)
        source = Path(spec["path"]).resolve().name
        if any(p["source"] == source for p in per):
            raise RetinaInputError(f"Two sets are both called {source!r}; combine sets from folders of different "
                                   f"names.")
        for r in index.records:
            rows.append([os.path.relpath(Path(r.path).resolve(), out.resolve()), r.label, r.patient_id or "",
                         {"OD": "right", "OS": "left"}.get(r.eye or "", ""), source,
                         str(r.meta.get("label_from", r.label)).split("=", 1)[-1]])
        per.append({"source": source, "path": str(spec["path"]), "label_column": column or "label",
                    "label_map": mapping, "n": len(index.records),
                    "labels": dict(Counter(r.label for r in index.records))})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "labels.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["file", "label", "patient_id", "eye", "source", "source_label"])
        wr.writerows(rows)
    (out / COMBINED_FILE).write_text(json.dumps({"sets": per}, indent=1) + "\n")
    return {"out": str(out / "labels.csv"), "n": len(rows), "labels": dict(Counter(r[1] for r in rows)), "sets": per}


def combined_from(root: str | Path) -> list[str]:
    """The folders a `data combine` set at ``root`` was made from (empty for any other set)."""
    f = Path(root) / COMBINED_FILE
    return [str(s["path"]) for s in json.loads(f.read_text()).get("sets", [])] if f.is_file() else []


def lesion_mask(root: str | Path, path: str | Path, shape: tuple[int, int]):
    """The union of image `path`'s lesion masks (bool [H, W], any mask PNG of another size ignored); None when the
    image has no mask folder (not annotated), all False for an annotated lesion-free image."""
    import numpy as np
    from PIL import Image

    d, _ = lesion_mask_dir(root, path)
    if d is None or not d.is_dir():
        return None
    parts = [np.asarray(Image.open(p).convert("L")) > 127 for p in sorted(d.glob("*.png"))]
    parts = [m for m in parts if m.shape == tuple(shape)]
    return np.logical_or.reduce(parts) if parts else np.zeros(tuple(shape), bool)


# ------------------------------------------------------------------------------------------------ splits for training
def parse_fractions(text: str | None) -> tuple[float, float, float]:
    """``"0.6,0.2,0.2"`` -> (0.6, 0.2, 0.2); None -> the default (0.8, 0.1, 0.1)."""
    if not text:
        return (0.8, 0.1, 0.1)
    try:
        fr = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        fr = ()
    if len(fr) != 3:
        raise RetinaInputError(f"--split-fractions {text!r} is invalid. Expected three numbers train,val,test "
                               f"that add up to 1, e.g. 0.6,0.2,0.2.")
    return fr


SPLIT_METHODS = ("stratified", "patient_hash")


def split_patients(records, seed: int, fractions: str | None = None, method: str | None = None) -> dict:
    """The patient-level split of a set with none on disk: stratified by label (`patient_split`, the default), or
    by a keyed hash of the patient id (`hash_split`), which puts a patient in the same split in every set, e.g. the
    Mexico fundus and OCT sets and their true pairs. Sets with train/val/test folders keep them."""
    method = method or "stratified"
    if method not in SPLIT_METHODS:
        raise RetinaInputError(f"--split-by {method!r} unknown; choose one of {', '.join(SPLIT_METHODS)}.")
    fr = parse_fractions(fractions)
    if method == "patient_hash" and not (records and all(r.split for r in records)):
        return hash_split(records, fractions=fr, seed=seed)
    return patient_split(records, fractions=fr, seed=seed)


def training_splits(records, seed: int, fractions: str | None = None, method: str | None = None):
    """`split_patients`, with a validation split carved from train (10%) when the set has none; both must be
    non-empty."""
    splits = split_patients(records, seed, fractions, method)
    if not splits.get("val"):
        carved = patient_split(splits.get("train", []), fractions=(0.9, 0.1, 0.0), seed=seed, force=True)
        splits = {"train": carved["train"], "val": carved["val"], "test": splits.get("test", [])}
    if not splits.get("train") or not splits.get("val"):
        raise RetinaInputError("Training needs samples in both a training and a validation split.")
    return splits


# ------------------------------------------------------------------------------------------------ volume lesion masks
def resize_mask_3d(mask: "np.ndarray", size: tuple[int, int, int]) -> "np.ndarray":
    """Nearest-neighbour resize of a bool [D, H, W] mask; a lesion that vanishes keeps its centre voxel."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    if mask.shape == tuple(size):
        return mask.astype(bool)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    out = F.interpolate(t, size=tuple(size), mode="nearest")[0, 0].numpy() > 0.5
    if mask.any() and not out.any():
        idx = np.argwhere(mask).mean(0)
        out[tuple(min(s - 1, int(i * s / s0)) for i, s, s0 in zip(idx, size, mask.shape))] = True
    return out


def lesion_mask_files(root: Path, rel: str, suffix: str) -> list[Path]:
    """The mask files (`suffix`) under masks/<rel without extension>/ of a data set root, sorted."""
    stem = rel[: -len(".nii.gz")] if rel.endswith(".nii.gz") else str(Path(rel).with_suffix(""))
    d = root / "masks" / stem
    return sorted(d.glob(f"*{suffix}")) if d.is_dir() else []


def read_volume_mask(root: Path, path: Path, shape) -> "np.ndarray":
    """The union of a volume's lesion masks (masks/<volume>/*.nii.gz) as bool `shape`; all False when none."""
    import nibabel as nib
    import numpy as np

    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        return np.zeros(shape, bool)
    parts = []
    for p in lesion_mask_files(root, rel, ".nii.gz"):
        a = np.asarray(nib.load(str(p)).dataobj)
        a = a > (127 if a.max() > 1 else 0)
        if a.shape != tuple(shape):
            a = resize_mask_3d(a, shape)
        parts.append(a)
    return np.logical_or.reduce(parts) if parts else np.zeros(shape, bool)
