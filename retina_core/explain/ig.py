"""Integrated Gradients' shared pieces: the black baseline and the post-processing of a signed attribution into a
map (2-D images in `attribution`, each input of the fundus + OCT pair in `pair_methods`, volumes in
`volume_methods`)."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from .cam import normalise_map


def black_baseline(x: torch.Tensor, mean, std) -> torch.Tensor:
    """IG's baseline for a normalised input x [B, C, *spatial]: pixel intensity 0, normalised like x with the
    per-channel `mean` / `std` ((0 - mean) / std), not a zero tensor (mid-grey after normalisation)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(shape)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(shape)
    return ((torch.zeros_like(x) - m) / s).detach()


def postprocess_ig(a: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Signed [h, w] attribution -> map: smoothed, positive part, clipped at the 99.5th percentile, normalised."""
    side = min(a.shape[-2:])
    a = np.maximum(cv2.GaussianBlur(a.astype(np.float32), (0, 0), max(0.5, side / 112.0)), 0.0)
    hi = float(np.percentile(a, 99.5))
    if hi > 0:
        a = np.minimum(a, hi)
    return normalise_map(a, out_hw)
