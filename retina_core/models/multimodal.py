"""Fundus + OCT fusion (capability 6): two frozen encoders, concatenated embeddings, an MLP head, normal vs disease.

    fundus [B,3,h,w] -> fundus_dr_effnet_b0 (frozen) -> 1280 --+
                                                               +-> concat 1792 -> Linear 512, ReLU, Dropout 0.3
    OCT    [B,3,h,w] -> oct_resnet18        (frozen) ->  512 --+       -> Linear 2 (normal, disease)

The encoders are the bundled models, loaded (sha256-checked) through `load_model` when their weights are present,
else randomly initialised (tests). Only the head is trained and stored: the safetensors file holds `head.*` and
`encoder_digest` (the sha256 of both encoder files, also in the manifest entry), and loading refuses a head whose
encoders differ from the ones found. The encoders' BatchNorm stays in eval mode while the head trains (`train()`).

    python -m retina_core train --model fundus_oct_fusion --data data/paired --out runs/fusion          # true pairs
    python -m retina_core train --model fundus_oct_fusion --data data/aptos --pair-with data/oct ...    # virtual pairs
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..errors import RetinaInputError
from ..labels import DME2
from ..modality import Modality
from .loading import (LoadedModel, image_pixels, load_model, preprocess_image, read_manifest, register_model_class,
                      weights_dir)
from .registry import ModelCfg, create_model, register_model

log = logging.getLogger(__name__)

FUSION_CLASSES = ("normal", "disease")
# Labels of the source data sets that mean "no disease" when fundus / OCT labels are mapped to normal vs disease.
NORMAL_LABELS = frozenset({"normal", "no dr", "no_dr", "n", "0", "healthy"})


def binary_label(label: str) -> str:
    """A data set label mapped to the fusion task: "normal" (NORMAL, No DR, normal, ...) or "disease"."""
    return "normal" if str(label).strip().lower() in NORMAL_LABELS else "disease"


def _search_dirs(extra) -> list[Path]:
    dirs = []
    if isinstance(extra, (str, os.PathLike)):
        extra = str(extra).split(",")
    dirs += [Path(d) for d in (extra or []) if str(d).strip()]
    env = os.environ.get("RETINA_ENCODERS_DIR")
    if env:
        dirs += [Path(d) for d in env.split(",") if d.strip()]
    dirs.append(weights_dir())
    return dirs


def _load_encoder(name: str, dirs: list[Path], load: bool):
    """(network, cfg with the trained input size, sha256 or None, folder or None)."""
    if load:
        for d in dirs:
            if name in read_manifest(d):
                lm = load_model(name, weights_dir=d, device="cpu")
                return lm.net, lm.cfg, lm.sha256, str(d)
        log.warning("no weights for encoder %s in %s: using a random initialisation", name,
                    ", ".join(map(str, dirs)))
    net = create_model(name)
    return net, net.cfg, None, None


def _digest_bytes(sha: str | None) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(sha)) if sha else [0] * 32, dtype=torch.uint8)


class FundusOctFusion(nn.Module):
    """forward(fundus, oct) -> logits [B, 2]; forward_features -> concatenated embeddings [B, 1792];
    forward_head -> logits. Each input is preprocessed with its encoder's cfg (`preprocess_pair`)."""

    def __init__(self, cfg: ModelCfg):
        super().__init__()
        kw = cfg.builder_kwargs
        self.encoder_names = (kw.get("fundus_encoder", "fundus_dr_effnet_b0"), kw.get("oct_encoder", "oct_resnet18"))
        dirs = _search_dirs(kw.get("encoders_dir"))
        load = bool(kw.get("load_encoders", True))
        self.fundus_encoder, self.fundus_cfg, f_sha, f_dir = _load_encoder(self.encoder_names[0], dirs, load)
        self.oct_encoder, self.oct_cfg, o_sha, o_dir = _load_encoder(self.encoder_names[1], dirs, load)
        if kw.get("encoder_input_size"):   # tiny test variants
            size = tuple(kw["encoder_input_size"])
            self.fundus_cfg = replace(self.fundus_cfg, input_size=size)
            self.oct_cfg = replace(self.oct_cfg, input_size=size)
        self.encoder_sha256 = (f_sha, o_sha)
        self.encoder_dirs = (f_dir, o_dir)
        for enc in (self.fundus_encoder, self.oct_encoder):
            for p in enc.parameters():
                p.requires_grad_(False)
            enc.eval()
        dims = (self.fundus_encoder.net.num_features, self.oct_encoder.net.num_features)
        self.embed_dims = tuple(int(d) for d in dims)
        hidden, drop = int(kw.get("hidden", 512)), float(kw.get("dropout", 0.3))
        self.head = nn.Sequential(nn.Linear(sum(self.embed_dims), hidden), nn.ReLU(inplace=True), nn.Dropout(drop),
                                  nn.Linear(hidden, cfg.num_classes))
        self.register_buffer("encoder_digest", torch.stack([_digest_bytes(f_sha), _digest_bytes(o_sha)]))

    # ---- frozen encoders
    def train(self, mode: bool = True):
        super().train(mode)
        self.fundus_encoder.eval()     # frozen: BatchNorm statistics must not move
        self.oct_encoder.eval()
        return self

    @staticmethod
    def _embed(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return encoder.net.forward_head(encoder.net.forward_features(x), pre_logits=True)

    def embed_fundus(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed(self.fundus_encoder, x)

    def embed_oct(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed(self.oct_encoder, x)

    def forward_features(self, fundus: torch.Tensor, oct: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embed_fundus(fundus), self.embed_oct(oct)], dim=1)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, fundus: torch.Tensor, oct: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(fundus, oct))

    def preprocess_pair(self, fundus_pixels: np.ndarray, oct_pixels: np.ndarray, device="cpu"):
        """uint8 [H, W, 3] each -> ([1, 3, h, w], [1, 3, h', w']) normalised as each encoder was trained."""
        return (preprocess_image(fundus_pixels, self.fundus_cfg, device),
                preprocess_image(oct_pixels, self.oct_cfg, device))

    # ---- head-only weights
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """What the weights file stores: the head and the digest of the encoders it was trained on."""
        return {**{f"head.{k}": v for k, v in self.head.state_dict().items()}, "encoder_digest": self.encoder_digest}

    def encoder_info(self) -> dict:
        return {n: {"sha256": sha, "input_size": list(c.input_size), "weights_dir": d}
                for n, sha, c, d in zip(self.encoder_names, self.encoder_sha256, (self.fundus_cfg, self.oct_cfg),
                                        self.encoder_dirs)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A head-only state (the weights file) loads into the head after checking `encoder_digest`; a full state
        dict loads as usual."""
        keys = set(state_dict)
        if not keys or not all(k.startswith("head.") or k == "encoder_digest" for k in keys):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        if "encoder_digest" in state_dict:
            want = state_dict["encoder_digest"].to(torch.uint8).cpu()
            if not bool(want.any(dim=1).all()):
                raise RetinaInputError("This fusion head was trained on randomly initialised encoders (no encoder "
                                       "weights were found when it was trained), so it cannot be used. Retrain it "
                                       "with the encoder weights installed.")
            if not torch.equal(want, self.encoder_digest.cpu()):
                trained = [bytes(r.tolist()).hex()[:12] for r in want]
                found = [s[:12] if s else "random init" for s in self.encoder_sha256]
                raise RetinaInputError(
                    f"This fusion head was trained on encoder weights {trained[0]} ({self.encoder_names[0]}) and "
                    f"{trained[1]} ({self.encoder_names[1]}), but the encoders found are {found[0]} and {found[1]}. "
                    f"Install the matching encoder weights or retrain the head "
                    f"(`python -m retina_core train --model fundus_oct_fusion ...`).")
        head = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
        res = self.head.load_state_dict(head, strict=strict, assign=assign)
        return _IncompatibleKeys([f"head.{k}" for k in res.missing_keys], [f"head.{k}" for k in res.unexpected_keys])


def pair_parts(sample) -> tuple:
    """(fundus, oct) of a pair sample: a (fundus, oct) tuple / list or {"fundus": ..., "oct": ...}."""
    if isinstance(sample, dict):
        if set(sample) != {Modality.FUNDUS, Modality.OCT}:
            raise RetinaInputError("The fusion model needs {'fundus': image, 'oct': image}.")
        return sample[Modality.FUNDUS], sample[Modality.OCT]
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        return tuple(sample)
    raise RetinaInputError("The fusion model explains a pair: (fundus photograph, OCT B-scan).")


@register_model_class(Modality.FUNDUS_OCT)
class PairModel(LoadedModel):
    """A loaded fundus + OCT fusion model (`FundusOctFusion`): `preprocess((fundus, oct))` -> (fundus [B, 3, h, w],
    OCT [B, 3, h', w']); `predict_proba` -> [B, 2]; `explain` -> {"fundus": [H, W], "oct": [H', W']}."""

    def preprocess(self, sample) -> tuple[torch.Tensor, ...]:
        """A pair (`pair_parts`: (fundus, oct) or {"fundus": ..., "oct": ...}; each uint8 RGB or a batch [B, H, W, 3],
        greyscale or a RetinalImage) -> each image preprocessed with its encoder's cfg, on the model's device."""
        f, o = pair_parts(sample)
        return self.net.preprocess_pair(image_pixels(f), image_pixels(o), self.device)


register_model(ModelCfg(
    name="fundus_oct_fusion",
    arch="effnet_b0+resnet18->mlp",
    modality=Modality.FUNDUS_OCT,
    classes=FUSION_CLASSES,
    task="Fundus photograph + OCT B-scan of one eye: normal vs disease (screening / referral triage)",
    input_size=(3, 224, 224),
    weights="fundus_oct_fusion.safetensors",
    target_layer="fundus_encoder.net.bn2",
    referable=("disease",),
    builder_kwargs={"fundus_encoder": "fundus_dr_effnet_b0", "oct_encoder": "oct_resnet18", "hidden": 512,
                    "dropout": 0.3},
    card=("Fusion of the multimodal fundus + OCT source: the bundled fundus encoder (`fundus_dr_effnet_b0`, "
          "EfficientNet-B0, 1280-d pooled embedding) and OCT encoder (`oct_resnet18`, 512-d) stay frozen (BatchNorm "
          "in eval mode); their embeddings are concatenated (1792-d) into an MLP head (512, ReLU, dropout 0.3, 2 "
          "classes: normal vs disease). Each image is preprocessed as its encoder was trained. Trained on truly "
          "paired eyes (`pairs.csv`) or on virtual pairs (a fundus and an OCT of the same binary label drawn from "
          "separate data sets, re-paired every epoch), as in the source where fundus (APTOS) and OCT (Kermany) come "
          "from different patients. The weights file holds only the head plus the encoders' sha256; the head is "
          "refused if the installed encoders differ. Per-modality Grad-CAM: `explain.pair_methods.modality_cams`. "
          "Demo weights were trained on this project's synthetic retinal phantoms, not on patient images; their "
          "metrics are phantom metrics and say nothing about clinical accuracy."),
), FundusOctFusion)

register_model(ModelCfg(
    name="fundus_oct_dme_fusion",
    arch="resnet10t+resnet18->mlp",
    modality=Modality.FUNDUS_OCT,
    classes=DME2,
    task="Fundus photograph + OCT B-scan of one eye: diabetic macular oedema (DME) present or not",
    input_size=(3, 224, 224),
    weights="fundus_oct_dme_fusion.safetensors",
    target_layer="fundus_encoder.net.layer4",
    referable=("DME",),
    builder_kwargs={"fundus_encoder": "fundus_dme_resnet10t", "oct_encoder": "oct_dme_resnet18", "hidden": 128,
                    "dropout": 0.3},
    card=("The same fusion design on the real-data DME encoders: `fundus_dme_resnet10t` (512-d) and "
          "`oct_dme_resnet18` (512-d) frozen, embeddings concatenated into an MLP head (128, ReLU, dropout 0.3, "
          "noDME / DME). Trained and tested on TRUE pairs: the Mexico fundus photograph and OCT B-scan of the same "
          "eye (`python -m retina_core data pair`), split by a keyed hash of the patient id (`--split-by "
          "patient_hash`), the same split the two encoders were trained with, so test eyes are unseen by all "
          "three. docs/real_data.md says whether it beats the better single modality."),
), FundusOctFusion)
