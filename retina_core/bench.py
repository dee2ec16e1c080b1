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


def bench_batch_throughput(n_images: int = 48, batch_size: int = 16, repeats: int = 3) -> dict:
    """Batch screening (decode + gate + preprocess in workers, batched forward + Grad-CAM) versus a bare batched
    forward loop over already-preprocessed tensors of the same images, with the bundled OCT model."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from .analysis import get_model
    from .batch import prepare, run_local
    from .phantoms import oct_phantom

    model = get_model("oct_resnet18")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(n_images):
            path = Path(tmp) / f"b{i}.png"
            Image.fromarray(oct_phantom(("CNV", "DME", "DRUSEN", "NORMAL")[i % 4], seed=1000 + i).image).save(path)
            files.append(str(path))
        tensors = torch.stack([prepare(f).tensor for f in files])

        def bare():
            with torch.inference_mode():
                for i in range(0, n_images, batch_size):
                    model.net(tensors[i:i + batch_size])

        def screening():
            for _ in run_local(files, None, batch_size=batch_size, num_workers=1):
                pass

        t_bare = _median_seconds(bare, repeats, warmup=1)
        t_batch = _median_seconds(screening, repeats, warmup=1)
    return {"images": n_images, "batch_size": batch_size, "bare_forward_img_per_s": round(n_images / t_bare, 2),
            "screening_img_per_s": round(n_images / t_batch, 2), "throughput_ratio": round(t_bare / t_batch, 3),
            "target_ratio": 0.85, "meets_target": t_bare / t_batch >= 0.85}


def bench_matmul_efficiency(arch: str = "convnext_atto", batch: int = 16, size: int = 224, repeats: int = 5) -> dict:
    """Achieved GFLOP/s of batched ConvNeXt inference versus the machine's fp32 matmul GFLOP/s, same run."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_mm = _median_seconds(lambda: torch.mm(a, b), repeats)
    mm_gflops = 2 * n ** 3 / t_mm / 1e9
    net = timm.create_model(arch, pretrained=False, num_classes=8).eval()
    x = torch.randn(batch, 3, size, size)
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        net(x)
    flops = fc.get_total_flops()
    results = {}
    for layout in ("contiguous", "channels_last"):
        m = net.to(memory_format=torch.channels_last) if layout == "channels_last" else net
        xi = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

        def fwd():
            with torch.inference_mode():
                m(xi)

        results[layout] = flops / _median_seconds(fwd, repeats, warmup=1) / 1e9
    best = max(results, key=results.get)
    return {"arch": arch, "batch": batch, "input": size, "gflop_per_batch": round(flops / 1e9, 2),
            "matmul_gflops": round(mm_gflops, 1),
            "model_gflops": {k: round(v, 1) for k, v in results.items()}, "best_layout": best,
            "efficiency": round(results[best] / mm_gflops, 3), "target": 0.6,
            "meets_target": results[best] / mm_gflops >= 0.6}


def bench_cached_rerun(repeats: int = 5) -> dict:
    """Server time of a Streamlit rerun after the opacity slider moves on an analysed image (AppTest, same process)."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[1] / "app.py"
    at = AppTest.from_file(str(app), default_timeout=300)
    at.run()
    at.selectbox(key="sample").set_value("OCT phantom: choroidal neovascularisation (CNV)").run()
    t0 = time.perf_counter()
    at.selectbox(key="method").set_value("gradcam").run()
    first = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        at.slider(key="alpha").set_value(0.2 + 0.1 * (i % 5))
        t0 = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t0)
    return {"first_analysis_s": round(first, 3), "slider_rerun_ms": round(statistics.median(times) * 1e3, 1),
            "target_ms": 50, "meets_target": statistics.median(times) <= 0.05}


def run(repeats: int = 15, only: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    out = {"machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                       "device": "cpu", "platform": platform.platform(), "repeats": repeats}}
    parts = {"heatmap_overhead": lambda: [bench_heatmap_overhead(n, repeats)
                                          for n in ("oct_resnet18", "fundus_dr_effnet_b0")],
             "batch_throughput": bench_batch_throughput,
             "matmul_efficiency": bench_matmul_efficiency,
             "cached_rerun": bench_cached_rerun}
    for name, fn in parts.items():
        if not only or name in only:
            out[name] = fn()
    return out


def format_markdown(result: dict) -> str:
    rows = []
    if "heatmap_overhead" in result:
        rows += ["| model | bare forward (ms) | single-pass Grad-CAM (ms) | ratio (target <= 1.3) | "
                 "pytorch-grad-cam (ms) | ratio |", "|---|---|---|---|---|---|"]
        for r in result["heatmap_overhead"]:
            rows.append(f"| {r['model']} | {r['bare_forward_ms']} | {r['single_pass_gradcam_ms']} | "
                        f"{r['single_pass_ratio']}x | {r['pytorch_grad_cam_ms']} | {r['pytorch_grad_cam_ratio']}x |")
        rows.append("")
    if "batch_throughput" in result:
        b = result["batch_throughput"]
        rows.append(f"Batch screening: {b['screening_img_per_s']} img/s versus a bare batched forward "
                    f"{b['bare_forward_img_per_s']} img/s: ratio {b['throughput_ratio']} (target >= 0.85).")
    if "matmul_efficiency" in result:
        m = result["matmul_efficiency"]
        rows.append(f"ConvNeXt ({m['arch']}, batch {m['batch']}, {m['input']} px): {m['model_gflops']} GFLOP/s "
                    f"versus fp32 matmul {m['matmul_gflops']} GFLOP/s: efficiency {m['efficiency']} (target >= 0.6).")
    if "cached_rerun" in result:
        c = result["cached_rerun"]
        rows.append(f"Slider rerun on a cached analysis: {c['slider_rerun_ms']} ms server time (target <= 50 ms); "
                    f"first analysis {c['first_analysis_s']} s.")
    return "\n".join(rows)
