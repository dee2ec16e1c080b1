"""Deterministic synthetic retinal phantoms with lesion masks (see docs/phantoms.md).

- fundus_phantom(label, seed, size=512): colour fundus photograph, uint8 [H,W,3]
- oct_phantom(label, seed, width=512, height=496): OCT B-scan through the fovea, uint8 [H,W]
- oct_volume(label, seed, n_slices=32, height=128, width=128): OCT cube, float32 [D,H,W] in [0,1]
- paired_phantoms(seed): (fundus, OCT) of the same virtual eye, label "normal" | "disease"
- write_dataset(kind, n, seed, out, layout=None, size=None): data sets in the real on-disk layouts

Same (label, seed, size) -> identical arrays; anatomy, camera and lesions use separate random streams, so the camera
look never depends on the label.
"""

from ._common import Phantom
from .dataset import IEEE_CAT_TO_NAME, KERMANY_ROOT, KINDS, LAYOUTS, write_dataset
from .fundus import FUNDUS_LABELS, canonical_fundus_label, fundus_phantom
from .oct import C8_SIZES, KERMANY_SIZES, OCT_LABELS, canonical_oct_label, oct_phantom
from .volume import DISEASE_CLASSES, VOLUME_LABELS, oct_volume, paired_phantoms

__all__ = [
    "Phantom", "fundus_phantom", "oct_phantom", "oct_volume", "paired_phantoms", "write_dataset",
    "FUNDUS_LABELS", "OCT_LABELS", "VOLUME_LABELS", "DISEASE_CLASSES", "KINDS", "LAYOUTS", "KERMANY_ROOT",
    "KERMANY_SIZES", "C8_SIZES", "IEEE_CAT_TO_NAME", "canonical_fundus_label", "canonical_oct_label",
]
