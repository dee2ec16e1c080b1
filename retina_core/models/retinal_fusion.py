"""RetinalFusionNet (capability 3): OCT-C8 classification with a semantic and an edge branch fused by MSFA.

The public RetinalFusionNet repository publishes no code, so this design is ours (docs/models.md):

    x [B,3,H,W] --> net (timm ConvNeXt)  --stage 3 (stride 16), stage 4 (stride 32)--+
       |                                                                             +--> MSFA --> head --> logits
       +--> grey --> FixedHighPass (Sobel x, Sobel y, Laplacian, |grad|; frozen) --> edge CNN (5 stride-2 blocks)
                                                      -- block 4 (stride 16), block 5 (stride 32) --+

MSFA (multi-scale fusion attention), per scale k: avg+max pooled features of each branch are projected to d and
layer-normed (s_k, e_k); a channel attention a_k = sigmoid(MLP([s_k, e_k])) reweights both; the learnable gate
lambda = sigmoid(theta) mixes them, f_k = lambda * a_s * s_k + (1 - lambda) * a_e * e_k; a scale attention
alpha = softmax_k(v . tanh(W f_k)) pools the scales, z = sum_k alpha_k f_k; head = dropout + linear.
lambda -> 1 means the semantic branch dominates, -> 0 the edge branch. `fusion_lambda()` reads it.

The ConvNeXt branch is named `net` so timm / ImageNet ConvNeXt checkpoints load with `train --init ckpt.pth`.

    python -m retina_core train --model retinal_fusion_net_atto --data data/octc8 --out runs/v3 --recipe v3_specialist
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..labels import OCT8
from ..modality import Modality
from .registry import ModelCfg, register_model

# Fixed high-pass kernels (3x3). They are buffers, never parameters: the edge branch always sees true gradients.
_SOBEL_X = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
_SOBEL_Y = [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]
_LAPLACIAN = [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]


class FixedHighPass(nn.Module):
    """[B, C, H, W] -> [B, 4, H, W]: Sobel x, Sobel y, Laplacian and gradient magnitude of the grey image."""

    out_channels = 4

    def __init__(self):
        super().__init__()
        k = torch.tensor([_SOBEL_X, _SOBEL_Y, _LAPLACIAN])[:, None]  # [3, 1, 3, 3]
        self.register_buffer("kernels", k, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=1, keepdim=True)
        g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), self.kernels.to(grey.dtype))
        mag = torch.sqrt(g[:, :1] ** 2 + g[:, 1:2] ** 2 + 1e-6)
        return torch.cat([g, mag], dim=1)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """Stride-2 conv-BN-ReLU then conv-BN-ReLU: halves the resolution."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EdgeBranch(nn.Module):
    """FixedHighPass then a sequential CNN of stride-2 blocks; returns the outputs of the last `n_scales` blocks."""

    def __init__(self, dims: tuple[int, ...], n_scales: int):
        super().__init__()
        self.highpass = FixedHighPass()
        # The high-pass responses differ in scale by an order of magnitude: a BN (affine) evens them out.
        self.input_norm = nn.BatchNorm2d(FixedHighPass.out_channels)
        chans = (FixedHighPass.out_channels, *dims)
        self.blocks = nn.ModuleList(_conv_block(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.n_scales = n_scales

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.input_norm(self.highpass(x))
        outs = []
        for blk in self.blocks:
            h = blk(h)
            outs.append(h)
        return outs[-self.n_scales:]


def _pool(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, 2C]: average and max pooling (edges are sparse: max keeps a thin boundary's signal)."""
    return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class MSFA(nn.Module):
    """Multi-scale fusion attention with a learnable scalar gate lambda = sigmoid(theta) (see module docstring).

    sem_dims / edge_dims: channels of each branch at each scale (same number of scales). Output: [B, dim].
    After a forward, `last_scale_weights` holds the scale attention [B, n_scales] (detached) for inspection.
    """

    def __init__(self, sem_dims: tuple[int, ...], edge_dims: tuple[int, ...], dim: int, lambda_init: float = 0.5):
        super().__init__()
        if len(sem_dims) != len(edge_dims) or len(sem_dims) < 2:
            raise ValueError("MSFA needs the same number (>= 2) of scales from both branches")
        self.proj_sem = nn.ModuleList(nn.Sequential(nn.Linear(2 * c, dim), nn.LayerNorm(dim)) for c in sem_dims)
        self.proj_edge = nn.ModuleList(nn.Sequential(nn.Linear(2 * c, dim), nn.LayerNorm(dim)) for c in edge_dims)
        hidden = max(dim // 4, 16)
        self.channel_att = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2 * dim))
            for _ in sem_dims)
        self.scale_score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False))
        lam = min(max(float(lambda_init), 1e-4), 1 - 1e-4)
        self.gate_logit = nn.Parameter(torch.tensor(float(torch.logit(torch.tensor(lam)))))
        self.last_scale_weights: torch.Tensor | None = None

    def fusion_lambda(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit)

    def forward(self, sem: list[torch.Tensor], edge: list[torch.Tensor]) -> torch.Tensor:
        lam = self.fusion_lambda()
        fused = []
        for k, (s_map, e_map) in enumerate(zip(sem, edge)):
            s = self.proj_sem[k](_pool(s_map))
            e = self.proj_edge[k](_pool(e_map))
            a_s, a_e = torch.sigmoid(self.channel_att[k](torch.cat([s, e], dim=1))).chunk(2, dim=1)
            fused.append(lam * a_s * s + (1.0 - lam) * a_e * e)
        f = torch.stack(fused, dim=1)                               # [B, K, dim]
        alpha = torch.softmax(self.scale_score(f).squeeze(-1), dim=1)  # [B, K]
        self.last_scale_weights = alpha.detach()
        return (alpha.unsqueeze(-1) * f).sum(dim=1)


class RetinalFusionNet(nn.Module):
    """Semantic ConvNeXt branch + edge branch, fused by MSFA. forward_features -> fused descriptor [B, dim],
    forward_head -> logits [B, num_classes]. CAM target layer: the last ConvNeXt stage (`net.stages.3`)."""

    N_SCALES = 2

    def __init__(self, cfg: ModelCfg):
        super().__init__()
        kw = dict(cfg.builder_kwargs)
        edge_dims = tuple(kw.pop("edge_dims", (32, 64, 128, 256, 256)))
        dim = int(kw.pop("fusion_dim", 256))
        drop = float(kw.pop("drop_rate", 0.2))
        lambda_init = float(kw.pop("lambda_init", 0.5))
        self.net = timm.create_model(cfg.arch, pretrained=False, num_classes=0, in_chans=cfg.input_size[0], **kw)
        self.net.head = nn.Identity()   # pooling/norm happen in MSFA; an unused head would break DDP
        sem_dims = tuple(int(f["num_chs"]) for f in self.net.feature_info)[-self.N_SCALES:]
        if len(edge_dims) < self.N_SCALES:
            raise ValueError(f"edge_dims needs at least {self.N_SCALES} blocks")
        self.edge = EdgeBranch(edge_dims, self.N_SCALES)
        self.msfa = MSFA(sem_dims, edge_dims[-self.N_SCALES:], dim, lambda_init)
        self.head_drop = nn.Dropout(drop)
        self.head = nn.Linear(dim, cfg.num_classes)

    def semantic_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.net.stem(x)
        outs = []
        for stage in self.net.stages:
            h = stage(h)
            outs.append(h)
        return outs[-self.N_SCALES:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.msfa(self.semantic_features(x), self.edge(x))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def fusion_lambda(self) -> float:
        """The gate lambda in (0, 1): weight of the semantic branch (1 - lambda goes to the edge branch)."""
        return float(self.msfa.fusion_lambda().detach())

    def training_report(self) -> dict:
        """Recorded in the manifest entry after training."""
        return {"fusion_lambda": round(self.fusion_lambda(), 4)}


_PHANTOM_NOTE = ("Demo weights were trained on this project's synthetic retinal phantoms, not on patient images. "
                 "Their metrics are phantom metrics and say nothing about clinical accuracy.")

_DESIGN = (
    "Dual-branch design of RetinalFusionNet (the public repository has no code; this implementation is ours): "
    "a ConvNeXt semantic branch models global pathology; an edge branch (fixed, non-learnable Sobel x/y and "
    "Laplacian filters plus gradient magnitude on the grey image, then a sequential CNN of stride-2 conv blocks) "
    "keeps layer boundaries and high-frequency topography; MSFA, a multi-scale fusion attention over avg+max pooled "
    "features of both branches at strides 16 and 32, reweights channels, mixes the branches with a learnable gate "
    "lambda = sigmoid(theta) (semantic weight; initial 0.5) and attends over the two scales. The trained lambda is "
    "recorded in the manifest (`fusion_lambda`). Recipes `v3_specialist` (long, gentle augmentation, label "
    "smoothing 0.1: structural detail) and `v4_sprint` (short, high lr, strong augmentation + mixup) are selected "
    "with `train --recipe`; `python -m retina_core ensemble` soft-votes them (V3+V4). Grad-CAM target: the last "
    "ConvNeXt stage. Input: OCT B-scan replicated to 3 channels, ImageNet normalisation. Referable: CNV, DME, CSR, "
    "MH, AMD (urgent or soon); DR, drusen: monitor. ")

_C8_REFERABLE = ("AMD", "CNV", "CSR", "DME", "MH")

register_model(ModelCfg(
    name="retinal_fusion_net",
    arch="convnext_tiny",
    modality=Modality.OCT,
    classes=OCT8,
    task="OCT B-scan, 8 classes (Retinal OCT-C8): AMD, CNV, CSR, DME, DR, drusen, macular hole, normal",
    weights="retinal_fusion_net.safetensors",
    target_layer="net.stages.3",
    fine_layer="net.stages.2",
    referable=_C8_REFERABLE,
    builder_kwargs={"edge_dims": (32, 64, 128, 256, 256), "fusion_dim": 256, "drop_rate": 0.2,
                    "drop_path_rate": 0.1},
    card=("Full-size RetinalFusionNet: ConvNeXt-Tiny (timm `convnext_tiny`, 28M) semantic branch, 224x224 input. "
          + _DESIGN + "No demo weights (about 60 MB in fp16, beyond the bundle budget): train it with "
          "`python -m retina_core train --model retinal_fusion_net --recipe v3_specialist ...`."),
), RetinalFusionNet)

_ATTO = dict(
    arch="convnext_atto",
    modality=Modality.OCT,
    classes=OCT8,
    task="OCT B-scan, 8 classes (Retinal OCT-C8): AMD, CNV, CSR, DME, DR, drusen, macular hole, normal",
    input_size=(3, 96, 96),
    target_layer="net.stages.3",
    fine_layer="net.stages.2",
    referable=_C8_REFERABLE,
    builder_kwargs={"edge_dims": (16, 32, 64, 128, 128), "fusion_dim": 160, "drop_rate": 0.2,
                    "drop_path_rate": 0.05},
)

register_model(ModelCfg(
    name="retinal_fusion_net_atto", weights="retinal_fusion_net_atto.safetensors", **_ATTO,
    card=("Demo RetinalFusionNet on CPU: ConvNeXt-Atto (timm `convnext_atto`, 3.4M) semantic branch, narrow edge "
          "branch, MSFA width 160, 96x96 input. Demo weights: the V3 specialist recipe; after training lambda = "
          "0.491 (from 0.5: the edge branch gained a little weight; the manifest's `fusion_lambda` is authoritative). " + _DESIGN + _PHANTOM_NOTE),
), RetinalFusionNet)

register_model(ModelCfg(
    name="retinal_fusion_net_atto_v4", weights="retinal_fusion_net_atto_v4.safetensors", **_ATTO,
    card=("The same architecture as `retinal_fusion_net_atto`, with demo weights from the V4 sprint recipe; "
          "the V3+V4 ensemble is `python -m retina_core ensemble --models retinal_fusion_net_atto,"
          "retinal_fusion_net_atto_v4 --data ...`. After V4 training lambda = 0.482. " + _DESIGN + _PHANTOM_NOTE),
), RetinalFusionNet)
