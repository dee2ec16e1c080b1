"""Heatmaps of the fundus + OCT fusion model (`fundus+oct`): one map per input, from one forward.

- "gradcam": Grad-CAM at both encoders' target layers in one forward and one backward (`modality_cams`);
- "integrated_gradients": captum IG on both inputs at once from black images (`pair_integrated_gradients`), each
  attribution post-processed as for single images.

`attribution.explain_pair` serves these maps; explain-eval (`audit.evaluate_nd`) scores them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import RetinaInputError
from ..modality import Modality
from ..models.loading import LoadedModel, as_model
from ..models.multimodal import FundusOctFusion
from .cam import capture_as_leaf, get_module, normalise_map
from .ig import black_baseline, postprocess_ig

FUSION_METHODS = ("gradcam", "integrated_gradients")
ResolvedNet = LoadedModel   # what the volume / pair methods and their evaluation read: `models.as_model`'s result


def resolve_net(model, weights_dir=None) -> LoadedModel:
    """A registered model name, LoadedModel or nn.Module with a cfg as the LoadedModel of its modality
    (`models.as_model`), its network put in eval mode."""
    m = as_model(model, weights_dir)
    m.net.eval()
    return m


def modality_cams(net: FundusOctFusion, fundus: torch.Tensor, oct: torch.Tensor, targets=None):
    """Per-modality Grad-CAM in one forward/backward: (logits [B, 2], fundus cams [B, h, w], OCT cams [B, h', w'])
    at each encoder's target layer (not normalised; `cam.normalise_map` resizes and scales them)."""
    f_layer = get_module(net.fundus_encoder, net.fundus_encoder.cfg.target_layer)
    o_layer = get_module(net.oct_encoder, net.oct_encoder.cfg.target_layer)
    with capture_as_leaf(f_layer) as fs, capture_as_leaf(o_layer) as os_, torch.enable_grad():
        logits = net(fundus, oct)
        idx = logits.argmax(1) if targets is None else torch.as_tensor(targets, device=logits.device).reshape(-1)
        score = logits.gather(1, idx[:, None]).sum()
        grads = torch.autograd.grad(score, [fs["activations"], os_["activations"]])
    cams = []
    for g, a in zip(grads, (fs["activations"], os_["activations"])):
        w = g.mean(dim=(2, 3), keepdim=True)
        cams.append(torch.relu((w * a.detach()).sum(dim=1)).float().cpu().numpy())
    return logits.detach(), cams[0], cams[1]


def pair_tensors(m: LoadedModel, f: np.ndarray, o: np.ndarray):
    """The pair preprocessed for the two encoders: ([1, 3, h, w], [1, 3, h', w']) (`PairModel.preprocess`)."""
    return m.preprocess((f, o))


def pair_maps(m: LoadedModel, net: nn.Module, f: np.ndarray, o: np.ndarray, target: int | None = None,
              method: str = "gradcam") -> tuple[np.ndarray, int, dict[str, np.ndarray]]:
    """(calibrated probabilities [K], explained class, {"fundus": map, "oct": map}) of one pair; each map float32
    in [0, 1] at its image's size, normalised on its own. "gradcam": one forward and one backward for both
    encoders' target layers (`modality_cams`); "integrated_gradients": captum IG on both inputs
    at once from black images, each attribution post-processed as for single images."""
    if method not in FUSION_METHODS:
        raise RetinaInputError(f"Unknown method {method!r} for a fundus + OCT model; choose from "
                               f"{', '.join(FUSION_METHODS)}.")
    a, b = pair_tensors(m, f, o)
    if method == "gradcam":
        logits, cf, co = modality_cams(net, a, b, None if target is None else [int(target)])
        probs = torch.softmax(logits.float() / m.temperature, dim=1)[0].cpu().numpy()
        k = int(np.argmax(probs)) if target is None else int(target)
        return probs, k, {Modality.FUNDUS: normalise_map(cf[0], f.shape[:2]),
                          Modality.OCT: normalise_map(co[0], o.shape[:2])}
    with torch.no_grad():
        logits = net(a, b)
    probs = torch.softmax(logits.float() / m.temperature, dim=1)[0].cpu().numpy()
    k = int(np.argmax(probs)) if target is None else int(target)
    fa, oa = pair_integrated_gradients(net, a, b, k, m.net.fundus_cfg, m.net.oct_cfg)
    return probs, k, {Modality.FUNDUS: postprocess_ig(fa[0], f.shape[:2]),
                      Modality.OCT: postprocess_ig(oa[0], o.shape[:2])}


def pair_integrated_gradients(net: nn.Module, a: torch.Tensor, b: torch.Tensor, k: int, f_cfg, o_cfg,
                              n_steps: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """captum IntegratedGradients of class k on both inputs of a fusion net from black images (each normalised
    as its encoder's input): signed attributions summed over channels, ([B, h, w], [B, h', w'])."""
    from captum.attr import IntegratedGradients

    was = net.training
    net.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            fa, oa = IntegratedGradients(net).attribute(
                (a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)),
                baselines=(black_baseline(a, f_cfg.mean, f_cfg.std), black_baseline(b, o_cfg.mean, o_cfg.std)),
                target=int(k), n_steps=n_steps, internal_batch_size=8)
    finally:
        net.train(was)
    return fa.detach().sum(1).float().cpu().numpy(), oa.detach().sum(1).float().cpu().numpy()
