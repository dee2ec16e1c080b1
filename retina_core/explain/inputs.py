"""Which inputs a volume + metadata model's suggestion rests on: exact Shapley values of its P(disease) over the
image and each clinical value.

    >>> r = input_shapley(model, volume, {"age": 71, "hba1c": 8.2, ...}, eye="OD")
    >>> r.values        # {"image": 0.41, "hba1c": 0.22, "age": 0.01, ...}; they sum to r.p - r.p_reference

The OCT volume model reads the volume and clinical values together (models/volume3d.py), so its 3-D Grad-CAM shows
only where it looked in the image, not how much the image mattered next to, say, HbA1c. Here every input is a
player: the image is either the volume or its blurred copy (the deletion baseline of explain-eval, `volume_blur`),
and a clinical value is either given or left out (the model's own "not recorded": the training mean). The value of a
coalition is the calibrated P(disease) with those inputs present. With one image and six values there are 2^7 = 128
coalitions; the 3-D network runs only twice (the volume and its blur), the small metadata branch and head on all 128,
so the values are exact, not sampled, and cost about two forwards. captum's ShapleyValues would enumerate the
7! = 5040 permutations (35k forwards) and ShapleyValueSampling would approximate; neither shares the image branch.

Shapley values are additive: they sum to P(disease) minus the reference's (blurred volume, no clinical values).
They describe this model, not the disease: a large HbA1c share means the model leans on HbA1c, which on the
phantom data is how diabetic eyes were generated (phantoms/volume.py).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import RetinaInputError
from ..modality import Modality
from ..models.registry import model_cfg

IMAGE = "image"


@dataclass
class InputAttribution:
    values: dict[str, float]       # input -> Shapley value (probability units); "image" first, then the clinical ones
    p: float                       # calibrated P(disease) with every input
    p_reference: float             # blurred volume, no clinical values
    p_image_only: float            # the volume, no clinical values
    p_metadata_only: float         # blurred volume, the clinical values given
    missing: tuple[str, ...]       # clinical values not given (their Shapley value is 0: nothing to remove)

    def shares(self) -> dict[str, float]:
        """|value| / sum |values|: how the suggestion's evidence splits across inputs (0 when nothing moved)."""
        tot = sum(abs(v) for v in self.values.values())
        return {k: (abs(v) / tot if tot > 0 else 0.0) for k, v in self.values.items()}


def shapley_from_coalitions(value, n: int) -> np.ndarray:
    """Exact Shapley values of n players from value(mask) for every mask (bool tuple of length n): the weighted
    mean, over coalitions S without i, of value(S + i) - value(S), weights |S|! (n - |S| - 1)! / n!."""
    v = {m: float(value(m)) for m in itertools.product((False, True), repeat=n)}
    phi = np.zeros(n)
    for m, val in v.items():
        k = sum(m)
        for i in range(n):
            if not m[i]:
                with_i = m[:i] + (True,) + m[i + 1:]
                phi[i] += math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) * (v[with_i] - val)
    return phi


@torch.no_grad()
def input_shapley(model, volume: np.ndarray, meta: dict, eye: str | None = None) -> InputAttribution:
    """Exact Shapley values of P(disease) over the image and the model's clinical inputs, for one volume.
    model: a LoadedModel (or the bare VolumeFusion3D) of modality oct_volume; volume float32 [D, H, W] in [0, 1];
    meta {age, sex, va_logmar, cst_um, hba1c} (None = not recorded); eye "OD"/"OS"."""
    from ..models.volume3d import encode_metadata, preprocess_volume
    from .volume_methods import volume_blur

    net = model if hasattr(model, "meta_features") else getattr(model, "net", model)   # bare net or LoadedModel
    cfg = model_cfg(model)
    if cfg is None or getattr(cfg, "modality", "") != Modality.OCT_VOLUME or not hasattr(net, "fuse"):
        raise RetinaInputError("Input attribution is for the OCT volume + clinical values models (oct_volume).")
    vol = np.asarray(volume, np.float32)
    if vol.ndim != 3:
        raise RetinaInputError(f"Expected one OCT volume [slices, height, width], got shape {vol.shape}.")
    t = float(getattr(model, "temperature", 1.0) or 1.0)
    try:
        device = next(net.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = net.training
    net.eval()
    feats = tuple(getattr(net, "meta_features", ()))
    m = torch.from_numpy(encode_metadata(meta or {}, eye, feats))[None].to(device)
    given = [i for i, f in enumerate(feats) if torch.isfinite(m[0, i])]
    x = torch.cat([preprocess_volume(vol, cfg, device), preprocess_volume(volume_blur(vol), cfg, device)])
    img = net.embed_image(x)                            # [2, E]: the volume, its blur
    players = [IMAGE] + [feats[i] for i in given]
    masks = list(itertools.product((False, True), repeat=len(players)))
    metas = m.repeat(len(masks), 1)
    for r, mask in enumerate(masks):
        for j, i in enumerate(given):
            if not mask[j + 1]:
                metas[r, i] = float("nan")             # "not recorded": standardised to the training mean
    f = net.fuse(img[[0 if mask[0] else 1 for mask in masks]], metas)
    p = torch.sigmoid(net.forward_head(f).float()[:, 0] / t).cpu().numpy()
    table = dict(zip(masks, p))
    phi = shapley_from_coalitions(lambda mask: table[mask], len(players))
    if was_training:
        net.train()
    values = {IMAGE: float(phi[0]), **{f: 0.0 for f in feats}}
    values.update({feats[i]: float(phi[j + 1]) for j, i in enumerate(given)})
    full, none = tuple([True] * len(players)), tuple([False] * len(players))
    only_img = (True,) + (False,) * (len(players) - 1)
    only_meta = (False,) + (True,) * (len(players) - 1)
    return InputAttribution(values=values, p=float(table[full]), p_reference=float(table[none]),
                            p_image_only=float(table[only_img]), p_metadata_only=float(table[only_meta]),
                            missing=tuple(f for i, f in enumerate(feats) if i not in given))
