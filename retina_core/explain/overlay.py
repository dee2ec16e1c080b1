"""Turning heatmaps into pictures: colour overlays and the box around the strongest region."""
from __future__ import annotations

import cv2
import numpy as np


def heatmap_to_rgb(heatmap: np.ndarray) -> np.ndarray:
    """float32 [H, W] in [0, 1] -> uint8 [H, W, 3] (JET colour map, blue = low, red = high)."""
    grey = np.uint8(np.clip(heatmap, 0, 1) * 255)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend the coloured heatmap over uint8 [H, W, 3] `image`; alpha 0 = image only, 1 = heatmap only."""
    if image.shape[:2] != heatmap.shape:
        raise ValueError(f"image {image.shape[:2]} and heatmap {heatmap.shape} differ in size")
    return blend(image, heatmap_to_rgb(heatmap), alpha)


def blend(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * image + alpha * colours, rounded, for two uint8 [H, W, 3] arrays: the float32 formula is
    evaluated once for every pair of byte values (a 256 x 256 table) and looked up, the same bytes as computing
    it per pixel, about four times faster."""
    a = float(np.clip(alpha, 0.0, 1.0))
    levels = np.arange(256, dtype=np.float32)
    table = np.uint8(np.clip(((1 - a) * levels)[:, None] + (a * levels)[None, :] + 0.5, 0, 255))
    index = image.astype(np.uint16) << 8
    index |= colours
    return table.ravel()[index]


def strongest_region(heatmap: np.ndarray, frac: float = 0.25) -> tuple[int, int, int, int]:
    """Square box (x0, y0, x1, y1) of side `frac` x the shorter image side, centred on the heatmap's peak
    after light smoothing (so one hot pixel does not decide), clipped to the image."""
    h, w = heatmap.shape
    side = max(8, int(round(frac * min(h, w))))
    k = max(3, (side // 4) | 1)
    smooth = cv2.GaussianBlur(heatmap.astype(np.float32), (k, k), 0)
    cy, cx = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    x0 = int(np.clip(cx - side // 2, 0, max(0, w - side)))
    y0 = int(np.clip(cy - side // 2, 0, max(0, h - side)))
    return x0, y0, min(w, x0 + side), min(h, y0 + side)
