"""Benchmarks as ratios measured in one run against same-process baselines (medians of several repeats).

    python -m retina_core bench [--repeats 15] [--json]

Figures go to docs/benchmarks.md by hand; they are never asserted by timed unit tests.
"""
from __future__ import annotations

import platform
import statistics
import time

import torch

from .explain.cam import cam_with_library, gradcam_single_pass
from .models import create_model


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_heatmap_overhead(name: str, repeats: int = 15, size: int | None = None) -> dict:
    """predict + default heatmap (single-pass Grad-CAM) and pytorch-grad-cam's GradCAM versus a bare forward."""
    net = create_model(name).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    c, h, w = net.cfg.input_size
    x = torch.randn(1, c, size or h, size or w)
    layer = net.cfg.target_layer

    def bare():
        with torch.inference_mode():
            net(x)

    def single_pass():
        gradcam_single_pass(net, x, layer)

    def library():
        cam_with_library(net, x, layer, "gradcam-reference", [0])

    t_bare = _median_seconds(bare, repeats)
    t_single = _median_seconds(single_pass, repeats)
    t_lib = _median_seconds(library, max(3, repeats // 3))
    return {"model": name, "input": [c, size or h, size or w], "bare_forward_ms": round(t_bare * 1e3, 2),
            "single_pass_gradcam_ms": round(t_single * 1e3, 2), "pytorch_grad_cam_ms": round(t_lib * 1e3, 2),
            "single_pass_ratio": round(t_single / t_bare, 3), "pytorch_grad_cam_ratio": round(t_lib / t_bare, 3),
            "target_ratio": 1.3, "meets_target": t_single / t_bare <= 1.3}


def run(repeats: int = 15) -> dict:
    torch.manual_seed(0)
    return {"machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "device": "cpu", "platform": platform.platform(), "repeats": repeats},
            "heatmap_overhead": [bench_heatmap_overhead(n, repeats) for n in ("oct_resnet18", "fundus_dr_effnet_b0")]}


def format_markdown(result: dict) -> str:
    rows = ["| model | bare forward (ms) | single-pass Grad-CAM (ms) | ratio | pytorch-grad-cam (ms) | ratio |",
            "|---|---|---|---|---|---|"]
    for r in result["heatmap_overhead"]:
        rows.append(f"| {r['model']} | {r['bare_forward_ms']} | {r['single_pass_gradcam_ms']} | "
                    f"{r['single_pass_ratio']}x | {r['pytorch_grad_cam_ms']} | {r['pytorch_grad_cam_ratio']}x |")
    return "\n".join(rows)
