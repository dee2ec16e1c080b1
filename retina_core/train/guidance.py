"""Map-guidance losses: terms added to a classifier's loss so that its Grad-CAM evidence sits where it should.

    HealthyCamPenalty       --healthy-cam-penalty W   flat evidence maps on healthy training images (2-D CNNs)
    LesionCamGuidance       --lesion-cam-guidance W   the map's mass on lesion-mask cells (2-D CNNs, GAIN-style)
    VolumeLesionCamGuidance --lesion-cam-guidance W   the same for the volume model's 3-D Grad-CAM
    VolumeAttentionMining   --attention-mining W      GAIN's attention mining for the volume model

The image recipe (`train.engine`) and the volume recipe (`train.multimodal`) add them to their training steps;
docs/explanations.md says what each did on the phantoms and real sets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RetinaInputError
from ..explain.cam import get_module
from ..models.multimodal import NORMAL_LABELS
from ..models.registry import ModelCfg


class ClassEvidence:
    """Per-location class evidence of a CNN whose Grad-CAM layer feeds global average pooling and a linear
    classifier: z_k(p) = W_k . A(p) at every position p of that layer. The logits are its spatial mean (plus the
    bias) and Grad-CAM is relu(z_k) up to a scale. A forward hook keeps A of training (grad-enabled) forwards only,
    so validation batches are not held between epochs. Subclasses turn z into a loss term."""

    flag = ""

    def __init__(self, net: nn.Module, cfg: ModelCfg, weight: float):
        timm_net = getattr(net, "net", None)
        direct = (getattr(timm_net, "pretrained_cfg", {}).get("classifier") in ("fc", "classifier")   # pool -> Linear
                  and getattr(getattr(timm_net, "global_pool", None), "pool_type", "avg") == "avg")
        head = timm_net.get_classifier() if direct else None
        if not isinstance(head, nn.Linear) or not cfg.target_layer:
            raise RetinaInputError(f"{self.flag} needs a timm CNN whose Grad-CAM layer feeds global average "
                                   f"pooling and a linear classifier; {cfg.name} (as built) is not one.")
        healthy = [i for i, c in enumerate(cfg.classes) if c.strip().lower() in NORMAL_LABELS]
        if not healthy:
            raise RetinaInputError(f"{self.flag} needs a healthy class (No DR / normal); {cfg.name} has "
                                   f"{', '.join(cfg.classes)}.")
        self.head, self.healthy, self.weight = head, healthy[0], float(weight)
        self.store: dict = {}
        self.handle = get_module(net, cfg.target_layer).register_forward_hook(self._keep)

    def _keep(self, mod, inp, out) -> None:
        if torch.is_grad_enabled():
            self.store["a"] = out

    def evidence(self, rows: torch.Tensor) -> torch.Tensor:
        """z [b, K, h, w] for the selected rows of the last training forward (consumes the stored activations)."""
        a = self.store.pop("a")
        return torch.einsum("kc,bchw->bkhw", self.head.weight.float(), a[rows].float())

    def close(self) -> None:
        self.handle.remove()
        self.store.clear()


class HealthyCamPenalty(ClassEvidence):
    """Penalty that keeps healthy anatomy out of the class activation maps (`--healthy-cam-penalty W`).

    Structures every eye has (disc, fovea, vessels) cancel in the mean of z_k(p) but not in the map, so a map can
    peak on anatomy instead of a lesion. On training images of the healthy class (No DR / normal) this adds
    W x mean_{k,p} (z_k(p) - mean_p z_k(p))^2: healthy anatomy gives every class a flat map, which leaves the
    logits free (the mean is untouched), so on a diseased eye the map's relief comes from what differs from health.
    Image-level labels only; no lesion masks. With mixup, images whose two labels are both healthy count.
    """

    flag = "--healthy-cam-penalty"

    def __call__(self, healthy_rows: torch.Tensor) -> torch.Tensor:
        if not bool(healthy_rows.any()):
            self.store.pop("a", None)
            return self.head.weight.new_zeros(())
        z = self.evidence(healthy_rows)
        return self.weight * (z - z.mean((2, 3), keepdim=True)).pow(2).mean()


class LesionCamGuidance(ClassEvidence):
    """Lesion-mask guidance of the class activation maps (`--lesion-cam-guidance W`), for data sets that come with
    lesion masks for some or all of their diseased images (phantoms; IDRiD, FGADR or DDR arranged as
    ``masks/<image>/*.png``). Attention supervision in the manner of GAIN (Li et al. 2018) and of the lesion-attention
    DR graders trained on IDRiD (Zhou et al. 2019), in its plainest form.

    On each training image that has a non-empty lesion mask and is not of the healthy class, the spatial softmax of
    the evidence map z_c(p) is asked to put its mass on grid cells that hold a lesion pixel:
    W x -log sum_{p in lesion cells} softmax_p(z_c(p)), averaged over two classes c: the true grade and the
    predicted one (the map the app shows; the true grade again when the prediction is the healthy class). Only
    where the map peaks is constrained, not how large the evidence is, so the logits stay free. Images without
    masks train as usual. Refused with mixup (a mixed image's lesions belong to two eyes).
    """

    flag = "--lesion-cam-guidance"

    def __call__(self, masks: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        rows = (masks.flatten(1).amax(1) > 0) & (y != self.healthy)
        if not bool(rows.any()):
            self.store.pop("a", None)
            return self.head.weight.new_zeros(())
        z = self.evidence(rows)
        b, _, h, w = z.shape
        cells = F.adaptive_max_pool2d(masks[rows][:, None].float(), (h, w)).flatten(1) > 0     # [b, h*w]
        pred = logits.detach()[rows].argmax(1)
        pred = torch.where(pred == self.healthy, y[rows], pred)
        terms = []
        for c in (y[rows], pred):
            zc = z.gather(1, c.view(b, 1, 1, 1).expand(b, 1, h, w)).flatten(1)
            logp = F.log_softmax(zc, dim=1)
            terms.append(-logp.masked_fill(~cells, float("-inf")).logsumexp(1))
        return self.weight * torch.stack(terms).mean()


class VolumeLesionCamGuidance:
    """Lesion-mask guidance of the volume model's 3-D Grad-CAM (`--lesion-cam-guidance W`), the volume counterpart of
    `LesionCamGuidance`.

    The head is not linear on the pooled features (Linear 512 + ReLU, fused with the clinical values), so the
    per-location evidence is the actual Grad-CAM of the layer `volume_cam` explains (cfg.target_layer): with A the
    layer's output of the training forward, alpha_k = mean_p d(logit)/dA_k(p) and cam(p) = sum_k alpha_k A_k(p) (before
    the ReLU). The gradient is taken with create_graph=True, so the loss back-propagates through alpha too (double
    backward, through the head only). On each diseased volume with a non-empty lesion mask the spatial softmax of cam
    over the grid is asked to put its mass on cells holding a lesion voxel (adaptive max pooling of the mask to the
    grid): W x -log sum_{p in lesion cells} softmax_p(cam(p)), averaged over those volumes. The 2-D loss averages over
    the true and the predicted class (the true one again when the prediction is healthy); with one logit both are the
    disease map, so that average is this single term. Volumes without masks, and normal volumes, train as usual.

    A forward hook keeps A of grad-enabled forwards only (no validation batch is held); call `close()` when done.
    """

    flag = "--lesion-cam-guidance"

    def __init__(self, net: nn.Module, target_layer: str, weight: float, disease: int = 1):
        self.weight, self.disease, self.store = float(weight), int(disease), {}
        self.handle = get_module(net, target_layer).register_forward_hook(self._keep)

    def _keep(self, mod, inp, out) -> None:
        if torch.is_grad_enabled():
            self.store["a"] = out

    def cam(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Grad-CAM before the ReLU, cam [b, d, h, w], of the selected rows of the last training forward (consumes
        the stored activations), differentiable (create_graph)."""
        a = self.store.pop("a")
        (g,) = torch.autograd.grad(logits.reshape(len(logits), -1)[:, 0][rows].sum(), a, create_graph=True)
        g, a = g[rows].float(), a[rows].float()
        alpha = g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
        return (alpha * a).sum(1)

    def __call__(self, logits: torch.Tensor, masks: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """logits [B] or [B, 1] of the training forward, masks [B, D, H, W] at the input size, y [B] (1 = disease)."""
        rows = (masks.flatten(1) != 0).any(1) & (y == self.disease)
        if not bool(rows.any()):
            self.store.pop("a", None)
            return logits.new_zeros(()).float()
        return self.loss_from_cam(self.cam(logits, rows), masks[rows])

    def loss_from_cam(self, cam: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The loss on maps cam [b, d, h, w] already computed, masks [b, D, H, W]; rows with an empty mask are
        left out."""
        keep = (masks.flatten(1) != 0).any(1)
        if not bool(keep.any()):
            return cam.new_zeros(()).float()
        cells = F.adaptive_max_pool3d(masks[keep][:, None].float(), tuple(cam.shape[1:])).flatten(1) > 0
        logp = F.log_softmax(cam[keep].flatten(1), dim=1)
        return self.weight * (-logp.masked_fill(~cells, float("-inf")).logsumexp(1)).mean()

    def close(self) -> None:
        self.handle.remove()
        self.store.clear()


class VolumeAttentionMining:
    """GAIN's attention-mining loss (Li et al. 2018, "Tell me where to look"), for the volume model
    (`--attention-mining W`): on each diseased training volume, the voxels its 3-D Grad-CAM marks are replaced by a
    blurred copy through a soft mask T = sigmoid(omega (cam' - sigma)) (cam' the map after its ReLU, scaled to a
    peak of 1 and upsampled to the input; omega 10, sigma 0.5 as in GAIN), and W x sigmoid(z(what is left) -
    z(whole volume)) is added to the loss. Unlike GAIN's W x P(disease | what is left), the term is relative to the
    volume's own score: the absolute form was lowered most cheaply by moving the output bias down, which cost
    accuracy at the 0.5 threshold (0.78-0.91 on the phantom test split, docs/explanations.md) and which no
    temperature can undo for a one-logit model. The map is trained to cover what the decision rests on, so
    deleting in its order lowers P(disease) fast: it ties the map to the prediction, which lesion guidance alone does not (the stride-4 runs of
    docs/explanations.md pointed at lesions no more faithfully than a random map). Works with or without lesion
    masks; with `--lesion-cam-guidance` both act on the same map. Costs one more forward and backward per batch.
    The clinical values are kept as they are: the model is pushed to call a volume whose marked region is gone
    healthy even when the values look diseased.
    """

    omega, sigma = 10.0, 0.5

    def __init__(self, weight: float, disease: int = 1):
        self.weight, self.disease = float(weight), int(disease)

    @staticmethod
    def blur(x: torch.Tensor) -> torch.Tensor:
        """The replacement for masked voxels: a 5x5x5 box blur (cheap; explain-eval's deletion uses a Gaussian)."""
        return F.avg_pool3d(x, kernel_size=5, stride=1, padding=2, count_include_pad=False)

    def __call__(self, net: nn.Module, x: torch.Tensor, meta: torch.Tensor, cam: torch.Tensor,
                 z_ref: torch.Tensor) -> torch.Tensor:
        """x [b, 1, D, H, W] and meta [b, M] of the diseased rows, cam [b, d, h, w] their differentiable Grad-CAM
        (before the ReLU), z_ref [b] their disease logits on the whole volume. Returns W x mean
        sigmoid(z_masked - z_ref): the masked volume's score relative to the unmasked one. Both are differentiated
        through, so the output bias cancels in the value and in the gradient: the term cannot be lowered by moving
        every disease score down (detaching z_ref would leave the bias a gradient)."""
        c = torch.relu(cam)
        c = c / (c.flatten(1).amax(1).view(-1, 1, 1, 1) + 1e-6)
        c = F.interpolate(c[:, None], size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        t = torch.sigmoid(self.omega * (c - self.sigma))
        x_am = x * (1 - t) + self.blur(x).detach() * t
        z = net(x_am, meta).reshape(len(x), -1)[:, 0]
        return self.weight * torch.sigmoid(z.float() - z_ref.float().reshape(-1)).mean()
