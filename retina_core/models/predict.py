"""Batch inference on files and records: calibrated probabilities of a loaded model for image files
(`predict_paths`), fundus + OCT file pairs (`predict_pairs`) and OCT volume records (`predict_volumes`), and the
volume input pipeline that training (train/multimodal.py) shares with them (`decode_volumes`, `metadata_matrix`,
`volume_lesion_mask`). `load_multimodal` loads the two-input models.

Used by the `evaluate` and `ensemble` commands and by training; it imports nothing from train/ or evaluate/.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io.datasets import read_volume_mask
from ..io.decode import read_image
from .loading import LoadedModel, load_model
from .volume3d import encode_metadata, preprocess_volume


@torch.inference_mode()
def predict_paths(model: LoadedModel, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """Calibrated probabilities [N, C] for image files, decoded by `read_image` and preprocessed from the cfg."""
    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.cat([model.preprocess(read_image(p).pixels) for p in paths[i:i + batch_size]])
        out.append(model.predict_proba(x).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.num_classes))


def load_multimodal(name: str, weights_dir=None, encoders_dir=None, device: str | None = None) -> LoadedModel:
    """`load_model` for the two-input models, with the same safety checks (safetensors only, sha256 against the
    manifest, every tensor must fit), plus what their manifest entry records: the volume model's fusion mode, and
    for fundus_oct_fusion the encoders, looked up in `encoders_dir` (comma-separated), RETINA_ENCODERS_DIR, then
    the bundled weights folder (the head refuses encoders other than those it was trained on)."""
    return load_model(name, weights_dir=weights_dir, device=device,
                      **({"encoders_dir": encoders_dir} if encoders_dir else {}))


@torch.inference_mode()
def predict_pairs(model: LoadedModel, fundus_paths, oct_paths, batch_size: int = 32) -> np.ndarray:
    """Calibrated probabilities [N, 2] (normal, disease) for fundus/OCT file pairs (a PairModel)."""
    out = []
    for i in range(0, len(fundus_paths), batch_size):
        pairs = [model.preprocess((read_image(f).pixels, read_image(o).pixels))
                 for f, o in zip(fundus_paths[i:i + batch_size], oct_paths[i:i + batch_size])]
        out.append(model.predict_proba(tuple(torch.cat(xs) for xs in zip(*pairs))).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2))


@torch.inference_mode()
def predict_volumes(model: LoadedModel, records, batch_size: int = 8) -> np.ndarray:
    """Calibrated P(disease) [N] for volume records (NIfTI path + metadata)."""
    out = []
    for i in range(0, len(records), batch_size):
        rs = records[i:i + batch_size]
        x = decode_volumes(rs, model.cfg, dtype=torch.float32)
        out.append(model.predict_proba((x, metadata_matrix(rs, model.net.meta_features)))[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def decode_volumes(records, cfg, dtype=torch.float16, mask_root=None):
    """[N, 1, D, H, W] preprocessed volumes (read_image -> preprocess_volume), kept in memory as float16.

    With `mask_root` (the data set's root), returns (volumes, masks): masks bool [N, D, H, W] is the union of each
    volume's lesion masks (``masks/<path without .nii.gz>/*.nii.gz``, read as explain-eval reads them; all False
    without masks) at the model's input size. A lesion voxel anywhere in an input voxel's footprint marks it
    (adaptive max pooling), so tiny lesions survive downsizing."""
    vols, masks = [], []
    size = tuple(cfg.input_size[1:])
    for r in records:
        pixels = read_image(r.path).pixels
        vols.append(preprocess_volume(pixels, cfg)[0].to(dtype))
        if mask_root is not None:
            masks.append(volume_lesion_mask(mask_root, r.path, np.shape(pixels)[-3:], size))
    out = torch.stack(vols) if vols else torch.zeros(0, *cfg.input_size, dtype=dtype)
    if mask_root is None:
        return out
    return out, (torch.stack(masks) if masks else torch.zeros(0, *size, dtype=torch.bool))


def volume_lesion_mask(root, path, shape, size) -> torch.Tensor:
    """bool [*size]: the union lesion mask of volume `path` (evaluate_nd's reader, at the volume's `shape`),
    resized to `size` by adaptive max pooling (any lesion voxel in an output voxel's footprint marks it)."""

    m = torch.from_numpy(read_volume_mask(Path(root), Path(path), tuple(shape)).astype(np.float32))
    if tuple(m.shape) != tuple(size):
        m = F.adaptive_max_pool3d(m[None, None], tuple(size))[0, 0]
    return m > 0


def metadata_matrix(records, features) -> torch.Tensor:
    return torch.from_numpy(np.stack([encode_metadata(r.meta, r.eye, features) for r in records])
                            if records else np.zeros((0, len(features)), np.float32))
