"""Losses. ``FocalLoss``: binary focal loss on one logit, with label smoothing and per-batch dynamic alpha
(the LearnedFusion3D recipe, capability 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("none", "mean", "sum")


class FocalLoss(nn.Module):
    """Binary focal loss FL = -alpha_t * (1 - p_t)^gamma * log(p_t) for a single logit per sample.

    Inputs: ``logits`` (N,) or (N, 1) raw scores, p = sigmoid(logit); ``targets`` same number of elements,
    labels in {0, 1} (soft labels in [0, 1] accepted).

    With y the raw labels and s = label_smoothing:
      - smoothed target  t = y * (1 - s) + 0.5 * s
      - log p_t          = -BCEWithLogits(logit, t)  (numerically stable; equals log p if t = 1, log(1 - p) if t = 0)
      - 1 - p_t          = -expm1(log p_t)
      - alpha_t          = alpha * t + (1 - alpha) * (1 - t)
    alpha:
      - dynamic_alpha=True (default, ``alpha`` must be None): per batch, from the raw labels,
        alpha = clamp((N - sum(y)) / N, alpha_clip, 1 - alpha_clip), i.e. the fraction of negatives, so the rarer
        positive class gets the larger weight; clamped (default [0.05, 0.95]) so a batch holding a single class
        still trains. It is a constant (no gradient).
      - dynamic_alpha=False: the fixed ``alpha`` in [0, 1]; alpha=None means no class weighting (alpha_t = 1).
    gamma >= 0 (gamma = 0 gives alpha-weighted BCE). reduction: "none" -> shape of ``logits``, "mean"/"sum" -> scalar.
    """

    def __init__(self, alpha: float | None = None, gamma: float = 2.0, label_smoothing: float = 0.0,
                 reduction: str = "mean", dynamic_alpha: bool = True, alpha_clip: float = 0.05):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if dynamic_alpha and alpha is not None:
            raise ValueError("a fixed alpha was given with dynamic_alpha=True; pass dynamic_alpha=False to use it")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if gamma < 0 or not 0.0 <= label_smoothing < 1.0 or not 0.0 <= alpha_clip <= 0.5:
            raise ValueError("need gamma >= 0, 0 <= label_smoothing < 1 and 0 <= alpha_clip <= 0.5")
        self.alpha, self.gamma, self.label_smoothing = alpha, float(gamma), float(label_smoothing)
        self.reduction, self.dynamic_alpha, self.alpha_clip = reduction, dynamic_alpha, float(alpha_clip)

    def batch_alpha(self, labels: torch.Tensor) -> torch.Tensor | float | None:
        """The alpha used for this batch of raw labels (see class docstring); None = no class weighting."""
        if not self.dynamic_alpha:
            return self.alpha
        neg_fraction = 1.0 - labels.detach().float().mean()
        return neg_fraction.clamp(self.alpha_clip, 1.0 - self.alpha_clip)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.numel() != targets.numel():
            raise ValueError(f"{logits.numel()} logits but {targets.numel()} targets")
        y = targets.reshape(logits.shape).to(logits)
        t = y * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        log_pt = -F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        loss = -torch.pow(-torch.expm1(log_pt), self.gamma) * log_pt
        alpha = self.batch_alpha(y)
        if alpha is not None:
            loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
