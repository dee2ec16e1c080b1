"""App-level benchmarks in a real browser: cold start and concurrent sessions (`bench --only cold_start,...`).

Both start the real server (`streamlit run app.py` on 127.0.0.1) and drive Debian's chromium with Playwright, as a
clinician's browser would. They need chromium and Playwright (requirements-dev.txt); without them they report why.
"""
from __future__ import annotations

import statistics
import time

from .browser import app_server, chromium_available, choose, launch, rss_mb, wait_idle

DISCLAIMER_TEXT = "not a medical device"          # every page carries it: the page has rendered
RESULT_TEXT = "Calibrated probabilities"          # the upload page shows it with a prediction
SAMPLES = ("OCT phantom: choroidal neovascularisation (CNV)", "Fundus phantom: moderate diabetic retinopathy",
           "OCT phantom: diabetic macular oedema (DME)", "Fundus phantom: no diabetic retinopathy",
           "OCT phantom: drusen", "Fundus phantom: glaucoma (large cup)", "OCT phantom: normal",
           "Fundus phantom: cataract (hazy media)")


def _missing() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "needs Playwright (pip install -r requirements-dev.txt)"
    if not chromium_available():
        return "needs Debian's chromium (apt-get install -y chromium)"
    return None


def _predict(page, sample: str, timeout_s: float = 300) -> float:
    """Pick a bundled sample on the upload page; seconds until its prediction is on screen."""
    t0 = time.perf_counter()
    choose(page, "bundled sample", sample, idle=False)
    page.get_by_text(RESULT_TEXT).first.wait_for(timeout=timeout_s * 1000)
    return time.perf_counter() - t0


def bench_cold_start(weights_dir=None) -> dict:
    """Seconds from `streamlit run` to: the health check answering, the first rendered page in the browser, and
    the first prediction on screen (a bundled OCT sample: model loading included). The browser is already open."""
    why = _missing()
    if why:
        return {"skipped": why}
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t0 = time.perf_counter()
        with app_server(weights_dir) as (url, proc):
            t_health = time.perf_counter() - t0
            page.goto(url)
            page.get_by_text(DISCLAIMER_TEXT).first.wait_for(timeout=120000)
            t_page = time.perf_counter() - t0
            _predict(page, SAMPLES[0])
            t_pred = time.perf_counter() - t0
            rss = rss_mb(proc.pid)
        browser.close()
    return {"to_health_s": round(t_health, 2), "to_first_page_s": round(t_page, 2),
            "to_first_prediction_s": round(t_pred, 2), "server_rss_mb": round(rss, 1)}


def bench_concurrent_sessions(n: int = 4, weights_dir=None) -> dict:
    """N browser sessions ask for a prediction at once (different bundled samples, fundus and OCT).

    Reports each session's latency (selection to prediction on screen; p50 / p95), the latency of one session
    alone on the same warm server, and the server's resident memory growth per extra session: the models are
    shared (st.cache_resource), so a session should only add its own images and results (target <= 40 MB)."""
    why = _missing()
    if why:
        return {"skipped": why}
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, app_server(weights_dir) as (url, proc):
        browser = launch(p)
        warm = browser.new_context().new_page()
        warm.goto(url)
        warm.get_by_text(DISCLAIMER_TEXT).first.wait_for(timeout=120000)
        _predict(warm, SAMPLES[0])                            # loads the OCT model
        wait_idle(warm)
        warm.reload()
        warm.get_by_text(DISCLAIMER_TEXT).first.wait_for(timeout=120000)
        _predict(warm, SAMPLES[1])                            # loads the fundus model
        wait_idle(warm)
        alone = []
        for s in SAMPLES[2:4]:                                # one session alone on the warm server
            warm.reload()
            warm.get_by_text(DISCLAIMER_TEXT).first.wait_for(timeout=120000)
            alone.append(_predict(warm, s))
            wait_idle(warm)
        rss0 = rss_mb(proc.pid)
        pages = [browser.new_context().new_page() for _ in range(n)]
        for pg in pages:
            pg.goto(url)
        for pg in pages:
            pg.get_by_text(DISCLAIMER_TEXT).first.wait_for(timeout=120000)
        starts = []
        for i, pg in enumerate(pages):                        # fire every request before waiting for any
            choose(pg, "bundled sample", SAMPLES[i % len(SAMPLES)], idle=False)
            starts.append(time.perf_counter())
        done: dict[int, float] = {}
        deadline = time.time() + 600
        while len(done) < n and time.time() < deadline:       # poll all sessions: when did each result appear?
            for i, pg in enumerate(pages):
                if i not in done and pg.get_by_text(RESULT_TEXT).count() > 0:
                    done[i] = time.perf_counter() - starts[i]
            time.sleep(0.05)
        for pg in pages:
            wait_idle(pg)
        rss1 = rss_mb(proc.pid)
        browser.close()
    lat = sorted(done.values())
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else lat * 19
    per = (rss1 - rss0) / n
    return {"sessions": n, "completed": len(done), "latency_p50_s": round(statistics.median(lat), 2),
            "latency_p95_s": round(q[18], 2), "latency_max_s": round(lat[-1], 2),
            "alone_latency_s": round(statistics.median(alone), 2), "rss_before_mb": round(rss0, 1),
            "rss_after_mb": round(rss1, 1), "rss_per_extra_session_mb": round(per, 1), "target_mb": 40,
            "meets_target": per <= 40 and len(done) == n}
