"""Counterfactual phantoms: does the model use the lesions its map is asked to point at?

The pointing game scores a map against the lesion masks. It presumes the model's decision rests on those lesions.
On phantoms that can be checked directly: each held-out diseased eye is re-rendered from its seeds as the same eye
with part of its disease left out (`phantoms.oct.leave_out`), and the model's probability for the eye's class is
compared on the same eyes:

- "without_masked": no lesion that any mask marks (the union the pointing game scores against): cysts, foci,
  exudates, subretinal fluid, drusen and pigment-epithelium detachments, subretinal hyper-reflective material,
  geographic atrophy, a macular hole;
- "without_ellipsoids": no intraretinal cysts, hyper-reflective foci or hard exudates (the masked lesions of the
  DR phantoms, most of the DME phantoms', and the cysts around a macular hole);
- "without_thickening": no diffuse swelling of the neural retina (drawn by the DR, DME, CNV and MH phantoms; no
  mask marks it).
- "without_masked_and_thickening": neither. Two cues can each suffice (a macular hole phantom is called from its
  hole or from its swollen edges alike): leaving one out then changes nothing although the model reads it when the
  other is gone, so "not needed while the other is there" is not "not used". The pair of variants tells them apart.

If leaving the masked lesions out does not lower the probability, the model does not use them, and a map that
pointed at them would not be faithful to it. `lesion_reliance` picks by the model:

- OCT volume models (`volume_lesion_reliance`): P(disease) with the clinical record as given and with none (the
  app's common case: a NIfTI uploaded alone). The record is the original eye's in every variant (its central
  subfield thickness included), so the no-record figures are the clean comparison of the images.
- 2-D OCT B-scan and colour fundus classifiers (`image_lesion_reliance`): the calibrated probability of the
  image's own class, whether it is still the top class, and P(healthy class); the map is the model's default
  method, for the predicted class, at the model's input size (as `explain-eval` scores it). Fundus eyes have only
  the "without_masked" variant (`fundus_phantom(without=("masked",))`).
- The fundus + OCT fusion model (`pair_lesion_reliance`): each image's lesions left out, and each input's map scored
  by deletion where that input carries the call (`faithful_alone`).

Only phantom sets can be re-rendered: the set must carry `phantom_meta.csv` (as `data phantoms` writes; B-scans
also need its `patient_seed` column, written since 2026-11-25), and every re-rendered original must match the stored
image (JPEGs after the same encoding), or the set is refused (made by another version of the generator).
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import RetinaInputError
from ..explain.attribution import default_method, explain_batch, resolve_model, to_pixels
from ..explain.pair_methods import resolve_net
from ..io.datasets import resize_mask_3d
from . import trust
from ..modality import IMAGE_MODALITIES, Modality
from ..models.registry import model_cfg, modality_of
from .common import (Sample, pick_round_robin, resize_2d, resize_sample, resize_volume, split_records,
                     union_mask)
from .evaluate_nd import meta_tensor_of, volume_map, volume_predict_fn

VARIANTS = {"original": (), "without_masked": ("masked",), "without_ellipsoids": ("ellipsoids",),
            "without_thickening": ("thickening",), "without_masked_and_thickening": ("masked", "thickening")}
MATCH_TOLERANCE = 0.02   # max |stored - re-rendered| (intensity in [0, 1]); NIfTI storage rounds a little
JPEG_QUALITY = {Modality.OCT: 92, Modality.FUNDUS: 90}   # what `data phantoms` writes JPEGs with (phantoms.dataset)
HEALTHY = ("normal", "no dr")             # a model's healthy class, lower case
_KINDS = {Modality.OCT_VOLUME: "oct-volume", Modality.OCT: "oct-kermany", Modality.FUNDUS: "fundus-dr",
          Modality.FUNDUS_OCT: "paired"}                # `data phantoms --kind` of each modality's sets
PAIR_VARIANTS = {"original": ((), ()), "without_fundus_lesions": (("masked",), ()),
                 "without_oct_lesions": ((), ("masked",)), "without_both_lesions": (("masked",), ("masked",))}


def _phantom_rows(root: Path, modality: str) -> dict[str, dict]:
    """phantom_meta.csv rows by file name (volumes) or by path relative to the set (B-scans)."""
    path = root / "phantom_meta.csv"
    kind = _KINDS[modality]
    if not path.is_file():
        raise RetinaInputError(f"{root} has no phantom_meta.csv: counterfactuals re-render phantoms from their "
                               f"seeds, so they need a set made with `python -m retina_core data phantoms --kind "
                               f"{kind}`.")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {Modality.OCT_VOLUME: {"seed", "oct_class"}, Modality.OCT: {"seed", "patient_seed", "label"},
            Modality.FUNDUS_OCT: {"seed", "oct_class", "dr_grade", "eye", "age", "sex", "patient_id"}}.get(modality,
                                                                                            {"seed", "label"})
    if not rows or not need <= set(rows[0]) or (modality == Modality.OCT and not rows[0].get("patient_seed")):
        raise RetinaInputError(f"{path} has no {' / '.join(sorted(need))} columns: it was not written by a "
                               f"current `data phantoms --kind {kind}` (B-scan sets need the patient_seed column, "
                               "written since 2026-11-25; make the set again with the same command).")
    key = (lambda r: Path(r.get("path", "")).name) if modality == Modality.OCT_VOLUME else (lambda r: r.get("path", ""))
    return {key(r): r for r in rows}


def _refuse_mismatch(name: str, err: float) -> None:
    if err > MATCH_TOLERANCE:
        raise RetinaInputError(f"{name} does not re-render from its seed (max difference {err:.3f}): the set was "
                               "made by another version of the phantom generator, so no counterfactual can be drawn "
                               "from it.")


def lesion_reliance(model, data_path, n: int | None = None, split: str | None = "all", seed: int = 0,
                    weights_dir=None) -> dict:
    """Counterfactual phantoms for an OCT volume model (`volume_lesion_reliance`), a 2-D OCT B-scan or colour
    fundus classifier (`image_lesion_reliance`) or the fundus + OCT fusion model (`pair_lesion_reliance`)."""
    modality = modality_of(model)
    if modality == Modality.OCT_VOLUME:
        return volume_lesion_reliance(model, data_path, n=n, split=split, seed=seed, weights_dir=weights_dir)
    if modality in IMAGE_MODALITIES:
        return image_lesion_reliance(model, data_path, n=n, seed=seed, weights_dir=weights_dir)
    if modality == Modality.FUNDUS_OCT:
        return pair_lesion_reliance(model, data_path, n=n, split=split, seed=seed, weights_dir=weights_dir)
    name = model if isinstance(model, str) else getattr(model_cfg(model), "name", type(model).__name__)
    raise RetinaInputError(f"Counterfactual phantoms are implemented for OCT B-scan, colour fundus, fundus + OCT and "
                           f"OCT volume models; {name} is a {str(modality)!r} model.")


def _nd_setup(model, weights_dir, data_path, split, modality: str, what: str):
    """(model, data root, records of `split`, split used, phantom_meta rows) for a volume or pair model."""
    m = resolve_net(model, weights_dir)
    if m.cfg.modality != modality:
        raise RetinaInputError(f"This counterfactual needs {what}; {m.name} is a {m.cfg.modality} model.")
    root = Path(data_path).expanduser()
    recs, used = split_records(m, root, split)
    return m, root, recs, used, _phantom_rows(root, modality)


# ------------------------------------------------------------------------------------------------ the skeleton
@dataclass
class Eye:
    """One drawn phantom eye, as a modality's adapter sees it. `cls`: the class its figures are pooled under;
    render(without) -> the eye re-rendered without those parts (any value the other three read); check(original)
    refuses an eye whose stored file the original render does not match; unchanged(variant, original): nothing of
    that kind in the eye; score(name, variant, out) predicts, maps and fills out[name] (on the original also the
    pointing game)."""
    cls: str
    render: Callable
    check: Callable
    unchanged: Callable
    score: Callable


def counterfactual_eyes(picked: list, variants: dict, eye_of: Callable) -> dict[str, list[dict]]:
    """{class: [one dict per eye: variant -> its figures (None: nothing of that kind)]} over the drawn records:
    eye_of(record, classes so far) -> an `Eye`, or None to skip the record (a healthy or unscored class)."""
    per: dict[str, list[dict]] = defaultdict(list)
    for r in picked:
        eye = eye_of(r, len(per))
        if eye is None:
            continue
        out: dict = {}
        original = None
        for name, without in variants.items():
            v = eye.render(without)
            if name == "original":
                eye.check(v)
                original = v
            elif eye.unchanged(v, original):
                out[name] = None                     # nothing of that kind in this eye
                continue
            eye.score(name, v, out)
        per[eye.cls].append(out)
    return per


def reliance_report(data_path, split, modality: str, method: str, variants: dict, per: dict, classes=None,
                    head: dict | None = None, tail: dict | None = None, note: str = "") -> dict:
    """The lesion-reliance report of `counterfactual_eyes`' figures: per class (in `classes`' order, default
    sorted) `_summarise`d; `head` goes before n_volumes, `tail` after per_class."""
    order = sorted(per) if classes is None else [c for c in classes if c in per]
    return {"data": str(data_path), "split": split, "modality": modality, "method": method,
            "variants": list(variants), **(head or {}), "n_volumes": sum(len(v) for v in per.values()),
            "per_class": {c: _summarise(per[c], variants) for c in order}, **(tail or {}), "note": note}


# ------------------------------------------------------------------------------------------------ volumes
def _volume_eye_of(m, root: Path, rows: dict, size: tuple[int, int, int]):
    """The adapter of an OCT volume model: P(disease) with the record as given and with none, 3-D Grad-CAM."""
    from ..io.decode import read_image
    from ..phantoms.volume import oct_volume

    tol = trust.default_tolerance(size[1:])

    def eye_of(r, _n):
        row = rows.get(Path(r.path).name)
        if row is None:
            raise RetinaInputError(f"{Path(r.path).name} is not in {root / 'phantom_meta.csv'}.")
        cls = row["oct_class"]
        if cls == "NORMAL":
            return None
        stored = np.asarray(read_image(r.path).pixels, np.float32)
        meta_t = meta_tensor_of(m, r.meta, r.eye)
        no_record = torch.full_like(meta_t, float("nan"))

        def render(without):
            vol = oct_volume(cls, int(row["seed"]), *stored.shape, without=without)
            return vol.image.astype(np.float32), vol.masks

        def score(name, v, out):
            x = resize_volume(v[0], size)
            p, hm = volume_map(m, m.net, x, meta_t, "gradcam")
            p0 = float(volume_predict_fn(m, no_record)(x[None])[0])
            out[name] = {"p": float(p), "called": bool(p >= 0.5), "p_no_record": p0, "called_no_record": p0 >= 0.5}
            mask = union_mask(v[1], v[0].shape) if name == "original" else None
            if mask is not None and mask.any():
                out["pointing_game"] = float(trust.pointing_game_3d(hm, resize_mask_3d(mask, size), tol))

        return Eye(cls, render, lambda v: _refuse_mismatch(Path(r.path).name, float(np.abs(v[0] - stored).max())),
                   lambda v, o: np.array_equal(v[0], o[0]), score)
    return eye_of


def volume_lesion_reliance(model, data_path, n: int | None = None, split: str | None = "all", seed: int = 0,
                           weights_dir=None) -> dict:
    """Per disease class of a phantom volume set: how P(disease) changes when the same eyes are re-rendered without
    their masked lesions, their ellipsoidal lesions or their diffuse thickening, with and without the clinical
    record, next to the pointing game of the model's 3-D Grad-CAM on the originals. n: volumes drawn round-robin
    over the labels (None: all); split as in explain-eval ("all" for a set the model never saw)."""
    m, root, recs, used, rows = _nd_setup(model, weights_dir, data_path, split, Modality.OCT_VOLUME,
                                          "an OCT volume model")
    picked = pick_round_robin(recs, len(recs) if n is None else int(n), seed)
    per = counterfactual_eyes(picked, VARIANTS, _volume_eye_of(m, root, rows, tuple(m.cfg.input_size[1:])))
    if not per:
        raise RetinaInputError(f"No diseased volume among the {len(picked)} drawn from {data_path} ({used}).")
    return reliance_report(
        data_path, used, Modality.OCT_VOLUME, "gradcam", VARIANTS, per,
        note=("P(disease) of the same phantom eyes re-rendered without part of their disease (means over the "
              "class; with the record as given and with none). A lesion the model uses lowers P when it is "
              "left out; where it does not, a map pointing at it would not be faithful to the model."))


def _jpeg_round_trip(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    im = Image.open(buf)
    return np.asarray(im.convert("L") if img.ndim == 2 else im.convert("RGB"))


def _render_2d(modality: str, row: dict, w: int, h: int, without: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    """(uint8 image as `data phantoms` wrote it before encoding, masks) of the phantom a phantom_meta.csv row
    describes, with `without` left out."""
    ps = int(row["patient_seed"]) if row.get("patient_seed") else None
    if modality == Modality.OCT:
        from ..phantoms.oct import oct_phantom

        ph = oct_phantom(row["label"], int(row["seed"]), w, h, patient_seed=ps,
                         patient={"patient_id": row.get("patient_id")}, without=without)
    else:
        from ..phantoms.fundus import fundus_phantom

        ph = fundus_phantom(row["label"], int(row["seed"]), w, patient_seed=ps,
                            patient={"eye": row["eye"]} if row.get("eye") else None, without=without)
    return ph.image, ph.masks


# ------------------------------------------------------------------------------------------------ 2-D images
def _image_eye_of(m, root: Path, rows: dict, method: str, healthy: str | None):
    """The adapter of a 2-D OCT B-scan or colour fundus classifier: the calibrated probability of the image's own
    class (still the top class?) and P(healthy class), the map of `method` for the predicted class."""
    from ..io.datasets import lesion_mask_dir
    from ..io.decode import read_image

    modality = m.cfg.modality
    classes = list(m.classes)
    size = tuple(m.cfg.input_size[1:])

    def eye_of(r, _n):
        _, rel = lesion_mask_dir(root, Path(r.path))
        row = rows.get(rel or "")
        if row is None:
            raise RetinaInputError(f"{rel or r.path} is not in {root / 'phantom_meta.csv'}.")
        cls = r.label
        if cls == healthy or row["label"] == "glaucoma":
            return None
        stored = np.asarray(read_image(r.path).pixels)
        if modality == Modality.OCT and stored.ndim == 3:
            stored = stored[..., 0]
        h, w = stored.shape[:2]
        quality = JPEG_QUALITY[modality] if Path(r.path).suffix.lower() in (".jpg", ".jpeg") else None

        def render(without):                       # (as rendered, as stored, masks)
            raw, masks = _render_2d(modality, row, w, h, without)
            return raw, (_jpeg_round_trip(raw, quality) if quality else raw), masks

        def score(name, v, out):
            mask = None
            if name == "original":
                ms = [np.asarray(x, bool) for x in v[2].values()]
                mask = np.logical_or.reduce(ms) if ms else None
            s = resize_sample(Sample(to_pixels(v[1]), cls, mask, modality), size)
            maps, probs, idx = explain_batch(m, s.image[None], method)
            k = classes.index(cls)
            out[name] = {"p": float(probs[0, k]), "called": int(np.argmax(probs[0])) == k}
            if healthy is not None:
                out[name]["p_healthy"] = float(probs[0, classes.index(healthy)])
            if name == "original" and s.mask is not None and s.mask.any():
                out["pointing_game"] = float(trust.pointing_game(maps[0], s.mask))

        return Eye(cls, render,
                   lambda v: _refuse_mismatch(rel, float(np.abs(v[1].astype(np.float32) - stored).max()) / 255.0),
                   lambda v, o: np.array_equal(v[0], o[0]), score)
    return eye_of


def image_lesion_reliance(model, data_path, n: int | None = None, seed: int = 0, weights_dir=None,
                          method: str | None = None) -> dict:
    """Per disease class of a phantom image set: how the calibrated probability of each image's own class changes
    when the same eye is re-rendered without part of its disease, next to the pointing game of the model's default
    map (`method`) on the originals, at the model's input size. OCT B-scans (`data phantoms --kind oct-kermany` or
    `oct-c8`): without the masked lesions, the ellipsoidal ones, the swelling. Colour fundus (`--kind fundus-dr` or
    `fundus-4class`; DR and AMD eyes): without the masked lesions. The draw is explain-eval's (n images round-robin
    over the model's classes, `seed`); images of the healthy class, of a class the model does not have, or of
    glaucoma (whose marked 'lesion' is the cup) are skipped. Each image also reports P(healthy class) when the model
    has one: removing every lesion should move it there."""
    from ..io.datasets import load_dataset

    if isinstance(model, str):
        from ..models import load_model

        model = load_model(model, weights_dir=weights_dir)
    m = resolve_model(model)
    modality = m.cfg.modality
    if modality not in IMAGE_MODALITIES:
        raise RetinaInputError(f"image_lesion_reliance needs an OCT B-scan or colour fundus model; {m.cfg.name} is "
                               f"a {modality} model.")
    variants = VARIANTS if modality == Modality.OCT else {k: VARIANTS[k] for k in ("original", "without_masked")}
    method = method or default_method(m)
    classes = list(m.classes)
    healthy = next((c for c in classes if c.lower() in HEALTHY), None)
    root = Path(data_path).expanduser()
    if not root.exists():
        raise RetinaInputError(f"Data folder {data_path} does not exist.")
    rows = _phantom_rows(root, modality)
    recs = [r for r in load_dataset(root).records if r.label in classes]
    if not recs:
        raise RetinaInputError(f"{data_path} has no image of the classes of {m.cfg.name}: {', '.join(classes)}.")
    picked = pick_round_robin(recs, len(recs) if n is None else int(n), seed)
    per = counterfactual_eyes(picked, variants, _image_eye_of(m, root, rows, method, healthy))
    if not per:
        raise RetinaInputError(f"No diseased image among the {len(picked)} drawn from {data_path}.")
    what = "B-scan" if modality == Modality.OCT else "photograph"
    return reliance_report(
        data_path, "all", modality, method, variants, per, classes=classes, head={"healthy_class": healthy},
        note=(f"Probability of each {what}'s own class for the same phantom eyes re-rendered without part "
              "of their disease (means over the class; 'called': still the top class). A lesion the model "
              "uses lowers it when it is left out; where it does not, a map pointing at it would not be "
              "faithful to the model."))


# ------------------------------------------------------------------------------------------------ pairs
def _pair_row_classes(frow: dict) -> tuple[str, str]:
    """(fundus class, OCT class) of a pair from its fundus phantom_meta.csv row (`phantoms.volume.paired_phantoms`:
    a DR grade with DME / DR, or AMD with AMD / drusen / CNV, or No DR with NORMAL)."""
    from ..labels import DR_GRADES

    o_cls = frow["oct_class"]
    if frow.get("dr_grade") not in (None, ""):
        return DR_GRADES[int(frow["dr_grade"])], o_cls
    return ("amd" if o_cls in ("AMD", "DRUSEN", "CNV") else "No DR"), o_cls


def _alone(per: dict, mod: str) -> dict | None:
    """Pooled deletion AUC of one input's map against a random map's, on the pairs still called disease once the
    other input's lesions are gone (that input then carries the call)."""
    got = [o[f"{mod}_alone"] for items in per.values() for o in items if o.get(f"{mod}_alone")]
    if not got:
        return None
    d = float(np.mean([g["deletion_auc"] for g in got]))
    dr = float(np.mean([g["deletion_auc_random_map"] for g in got]))
    return {"n": len(got), "deletion_auc": d, "deletion_auc_random_map": dr, "faithful_vs_random": d < dr}


def _pair_eye_of(m, root: Path, rows: dict, steps: int, seed: int):
    """The adapter of the fundus + OCT fusion model: P(disease) of the pair, each input's Grad-CAM; where one input
    carries the call (the other's lesions left out), the deletion AUC of its map against a random map's."""
    from ..io.decode import read_image
    from ..phantoms.fundus import fundus_phantom
    from ..phantoms.oct import oct_phantom
    from .evaluate_nd import pair_maps, pair_predict_fn

    k = list(m.cfg.classes).index("disease")
    sizes = {Modality.FUNDUS: m.net.fundus_cfg.input_size[1:], Modality.OCT: m.net.oct_cfg.input_size[1:]}

    def eye_of(r, n_classes):
        if r.label != "disease":
            return None
        paths = {Modality.FUNDUS: Path(r.path), Modality.OCT: Path(r.meta["oct"])}
        rel = {mod: p.relative_to(root).as_posix() for mod, p in paths.items()}
        if any(v not in rows for v in rel.values()):
            raise RetinaInputError(f"{rel[Modality.FUNDUS]} or its OCT partner is not in {root / 'phantom_meta.csv'}.")
        f_cls, o_cls = _pair_row_classes(rows[rel[Modality.FUNDUS]])
        stored = {mod: to_pixels(read_image(p).pixels) for mod, p in paths.items()}
        rendered: dict = {}                         # (modality, without) -> (pixels, masks): each drawn once

        def render_one(mod, without):
            if (mod, without) not in rendered:
                row = rows[rel[mod]]
                pat = {"patient_id": row["patient_id"], "eye": row["eye"], "age": int(row["age"]), "sex": row["sex"]}
                h, w = stored[mod].shape[:2]
                ph = (fundus_phantom(f_cls, int(row["seed"]), w, patient=pat, without=without) if mod == Modality.FUNDUS
                      else oct_phantom(o_cls, int(row["seed"]), w, h, patient=pat, without=without))
                rendered[mod, without] = (to_pixels(ph.image), ph.masks)
            return rendered[mod, without]

        def render(without):                        # ({modality: pixels}, {modality: masks})
            got = {mod: render_one(mod, w) for mod, w in zip((Modality.FUNDUS, Modality.OCT), without)}
            return {mod: g[0] for mod, g in got.items()}, {mod: g[1] for mod, g in got.items()}

        def check(v):
            for mod, img in v[0].items():
                _refuse_mismatch(rel[mod], float(np.abs(img.astype(np.float32)
                                                        - stored[mod].astype(np.float32)).max()) / 255.0)

        def score(name, v, out):
            imgs, masks = v
            (f, fm), (o, om) = (resize_2d(imgs[mod], union_mask(masks[mod], imgs[mod].shape[:2]), tuple(sizes[mod]))
                                for mod in IMAGE_MODALITIES)
            probs, _, maps = pair_maps(m, m.net, f, o)
            out[name] = {"p": float(probs[k]), "called": int(np.argmax(probs)) == k}
            if name == "original":
                for mod, mk in zip(IMAGE_MODALITIES, (fm, om)):
                    if mk is not None and mk.any():
                        out[f"pointing_game_{mod}"] = float(trust.pointing_game(maps[mod], mk))
            alone = {"without_fundus_lesions": Modality.OCT, "without_oct_lesions": Modality.FUNDUS}.get(name)
            if alone and steps and out[name]["called"]:
                # the other image's lesions gone, this one carries the call: is its map faithful to it then?
                img, other = (o, f) if alone == Modality.OCT else (f, o)
                predict = pair_predict_fn(m, alone, other)
                d = trust.deletion_insertion_auc(predict, img, maps[alone], k, steps=steps)["deletion_auc"]
                dr = trust.deletion_insertion_auc(predict, img, trust.random_map(maps[alone].shape, seed + n_classes),
                                                  k, steps=steps)["deletion_auc"]
                out[f"{alone}_alone"] = {"deletion_auc": float(d), "deletion_auc_random_map": float(dr)}

        fam = "DR" if f_cls not in ("amd", "No DR") else f_cls.upper()
        return Eye(f"{o_cls} + fundus {fam}", render, check,
                   lambda v, o: all(np.array_equal(v[0][mod], o[0][mod]) for mod in v[0]), score)
    return eye_of


def pair_lesion_reliance(model, data_path, n: int | None = None, split: str | None = "all", seed: int = 0,
                         weights_dir=None, steps: int = 16) -> dict:
    """Per disease class of a phantom pair set (`data phantoms --kind paired`): how the fusion model's P(disease)
    changes when the same eye's fundus photograph, OCT B-scan or both are re-rendered without the lesions their
    masks mark, next to the pointing game of each input's Grad-CAM on the originals. Which input's lesions does the
    two-input model use? Classes are named by the OCT class and the fundus one ("DME, fundus Moderate" is pooled
    as "DME + fundus DR").

    `faithful_alone`: with the fundus held fixed, deleting from the OCT can hardly move a fusion output that the
    fundus lesions already decide, so the OCT map's plain deletion AUC cannot show whether it is faithful. Here
    each input's map is scored where that input carries the call: on the pairs still called disease once the other
    image's lesions are gone, the deletion AUC of its map (`steps` steps; 0 skips it) against a random map's
    (`trust.random_map`)."""
    m, root, recs, used, rows = _nd_setup(model, weights_dir, data_path, split, Modality.FUNDUS_OCT,
                                          "the fundus + OCT fusion model")
    picked = pick_round_robin(recs, len(recs) if n is None else int(n), seed)
    per = counterfactual_eyes(picked, PAIR_VARIANTS, _pair_eye_of(m, root, rows, steps, seed))
    if not per:
        raise RetinaInputError(f"No diseased pair among the {len(picked)} drawn from {data_path} ({used}).")
    return reliance_report(
        data_path, used, Modality.FUNDUS_OCT, "gradcam", PAIR_VARIANTS, per,
        tail={"faithful_alone": {mod: _alone(per, mod) for mod in IMAGE_MODALITIES}},
        note=("P(disease) of the same phantom eyes with the fundus photograph, the OCT B-scan or both "
              "re-rendered without the lesions their masks mark (means over the class; 'called': still "
              "called disease). Leaving out the lesions of the input the model reads lowers it; an input "
              "whose lesions change nothing is not what the suggestion rests on, whatever its map shows."))


def _summarise(items: list[dict], variants=VARIANTS) -> dict:
    res: dict = {"n": len(items)}
    pg = [o["pointing_game"] for o in items if "pointing_game" in o]
    res["pointing_game"] = float(np.mean(pg)) if pg else None
    for mod in IMAGE_MODALITIES:                    # the fusion model: one map per input
        pg = [o[f"pointing_game_{mod}"] for o in items if f"pointing_game_{mod}" in o]
        if pg:
            res[f"pointing_game_{mod}"] = float(np.mean(pg))
    for name in variants:
        got = [o[name] for o in items if o.get(name)]
        if not got:
            res[name] = None
            continue
        res[name] = {"n": len(got), "p_disease": float(np.mean([g["p"] for g in got])),
                     "called": int(sum(g["called"] for g in got))}
        record = "p_no_record" in got[0]
        if "p_healthy" in got[0]:
            res[name]["p_healthy"] = float(np.mean([g["p_healthy"] for g in got]))
        if record:
            res[name]["p_disease_no_record"] = float(np.mean([g["p_no_record"] for g in got]))
            res[name]["called_no_record"] = int(sum(g["called_no_record"] for g in got))
        if name != "original":                      # the change on the same eyes, not two different means
            pairs = [(o["original"], o[name]) for o in items if o.get(name)]
            res[name]["drop"] = float(np.mean([a["p"] - b["p"] for a, b in pairs]))
            if record:
                res[name]["drop_no_record"] = float(np.mean([a["p_no_record"] - b["p_no_record"] for a, b in pairs]))
    return res


_WHAT = {"without_masked": "no masked lesions", "without_ellipsoids": "no cysts/foci",
         "without_thickening": "no swelling", "without_masked_and_thickening": "no lesions, no swelling",
         "without_fundus_lesions": "no fundus lesions", "without_oct_lesions": "no OCT lesions",
         "without_both_lesions": "no lesions in either"}
_DESCRIBE = {"without_masked": "without the lesions their masks mark", "without_ellipsoids": "without their cysts "
             "and foci alone", "without_thickening": "without their retinal swelling",
             "without_masked_and_thickening": "without both", "without_fundus_lesions": "with the fundus "
             "photograph's lesions left out", "without_oct_lesions": "with the OCT B-scan's lesions left out",
             "without_both_lesions": "with both left out"}


def describe_variants(rep: dict) -> str:
    """How the report's eyes were re-rendered, in words (the app's heading)."""
    parts = [_DESCRIBE[v] for v in _variants(rep)]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + (", and " if len(parts) > 2 else " and ") + parts[-1]


def _variants(rep: dict) -> list[str]:
    return [v for v in rep.get("variants", VARIANTS) if v != "original"]


def table_rows(rep: dict) -> list[dict]:
    """One row per phantom class of a lesion-reliance report (the app's table): eyes, pointing game, the mean
    probability of the class for the originals and each variant (volumes: also without the record), and the
    paired drop (None: no such lesion)."""
    rows = []
    for c, s in rep["per_class"].items():
        record = "p_disease_no_record" in (s["original"] or {})
        row = {"class": c, "eyes": s["n"]}
        if "pointing_game_fundus" in s or "pointing_game_oct" in s:
            row.update({"pointing game fundus": s.get("pointing_game_fundus"),
                        "pointing game OCT": s.get("pointing_game_oct")})
        else:
            row["pointing game"] = s["pointing_game"]
        row["P original"] = s["original"]["p_disease"]
        if record:
            row["P original, no record"] = s["original"]["p_disease_no_record"]
        for name in _variants(rep):
            v, what = s.get(name), _WHAT[name]
            row[f"P {what}"] = v["p_disease"] if v else None
            if record:
                row[f"P {what}, no record"] = v["p_disease_no_record"] if v else None
                row[f"drop {what}, no record"] = v["drop_no_record"] if v else None
            else:
                row[f"drop {what}"] = v["drop"] if v else None
        if rep.get("healthy_class") and s.get("without_masked"):
            row[f"P {rep['healthy_class']}, no masked lesions"] = s["without_masked"].get("p_healthy")
        rows.append(row)
    return rows


def format_lines(rep: dict) -> list[str]:
    """A readable table of a lesion-reliance report."""
    modality = rep.get("modality", Modality.OCT_VOLUME)
    what = ("mean P(disease) with record / without record" if modality == Modality.OCT_VOLUME else
            "mean P(disease), called / pairs" if modality == Modality.FUNDUS_OCT else
            "mean P(own class), called (still the top class) / eyes")
    names = _variants(rep)
    kind = {Modality.OCT_VOLUME: "volumes", Modality.OCT: "B-scans", Modality.FUNDUS: "photographs",
            Modality.FUNDUS_OCT: "pairs (PG: fundus/OCT)"}.get(rep.get("modality"), "images")
    lines = [f"Counterfactual phantoms ({rep['n_volumes']} diseased {kind}, {rep['data']}, split {rep['split']}): "
             f"{what}", f"{'class':20s} {'n':>3s} {'PG':>5s}  {'original':>13s}  "
             + "  ".join(f"{_WHAT[v]:>17s}" for v in names)]

    def cell(v):
        if not v:
            return "-"
        return (f"{v['p_disease']:.2f} / {v['p_disease_no_record']:.2f}" if "p_disease_no_record" in v
                else f"{v['p_disease']:.2f}, {v['called']}/{v['n']}")

    for c, s in rep["per_class"].items():
        pgs = [s.get(k) for k in ("pointing_game_fundus", "pointing_game_oct")]
        pg = ("/".join("-" if v is None else f"{v:.2f}" for v in pgs) if any(v is not None for v in pgs) else
              "-" if s["pointing_game"] is None else f"{s['pointing_game']:.2f}")
        lines.append(f"{c:20s} {s['n']:3d} {pg:>5s}  {cell(s['original']):>13s}  "
                     + "  ".join(f"{cell(s.get(v)):>17s}" for v in names))
    for mod, a in (rep.get("faithful_alone") or {}).items():
        if a:
            verdict = "faithful" if a["faithful_vs_random"] else "no more faithful than chance"
            lines.append(f"{mod} map where the {mod} image carries the call (the other image's lesions left out, "
                         f"{a['n']} pairs): deletion AUC {a['deletion_auc']:.3f} against "
                         f"{a['deletion_auc_random_map']:.3f} for a random map ({verdict})")
    if rep.get("healthy_class"):
        lines.append(f"P({rep['healthy_class']}) without the masked lesions: " + ", ".join(
            f"{c} {s['without_masked']['p_healthy']:.2f}" for c, s in rep["per_class"].items()
            if s.get("without_masked") and "p_healthy" in s["without_masked"]))
    lines.append(rep["note"])
    return lines
