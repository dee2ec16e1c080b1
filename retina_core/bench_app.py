"""App-level benchmarks in a real browser: cold start and concurrent sessions (`bench --only cold_start,...`).

Both start the real server (`streamlit run app.py` on 127.0.0.1) and drive Debian's chromium with Playwright, as a
clinician's browser would. They need chromium and Playwright (requirements-dev.txt); without them they report why.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time

from .browser import CpuSampler, app_server, chromium_available, choose, launch, rss_mb, wait_idle

# The sessions measure the analysis pages: demo mode (no sign-in, nothing stored), as a demo or kiosk would run.
BENCH_ENV = {"RETINA_MODE": "demo"}

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
        with app_server(weights_dir, env_extra=BENCH_ENV) as (url, proc):
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


@contextlib.contextmanager
def _weights_from(weights_dir):
    """Models of `weights_dir` (RETINA_WEIGHTS_DIR) for the duration, the process's own afterwards."""
    import os

    from .analysis import get_model

    saved = os.environ.get("RETINA_WEIGHTS_DIR")
    if weights_dir:
        os.environ["RETINA_WEIGHTS_DIR"] = str(weights_dir)
        get_model.cache_clear()
    try:
        yield
    finally:
        if weights_dir:
            if saved is None:
                os.environ.pop("RETINA_WEIGHTS_DIR", None)
            else:
                os.environ["RETINA_WEIGHTS_DIR"] = saved
            get_model.cache_clear()


def _analyses_back_to_back(samples: list[str], weights_dir=None) -> dict[int, float]:
    """Seconds for the same analyses as the sessions ask for, one after another in this process (decode at screen
    size + `analyze_all`, as the upload page does), models loaded and warmed first, at each torch thread count
    from 1 to the CPUs available: {threads: seconds}. The fastest is the baseline N sessions at once through the
    server should beat (on a machine other processes keep busy, one thread can be many times faster than two)."""

    import torch

    from .analysis import analyze_all
    from .io.decode import SCREEN_SIDE, read_image
    from .serving import available_cores
    from .webapp.common import sample_png

    threads = torch.get_num_threads()
    with _weights_from(weights_dir):
        try:
            data = [sample_png(s) for s in samples]
            for d in data[:2]:                               # load and warm both modalities' models
                analyze_all(read_image(d, max_side=SCREEN_SIDE))
            out = {}
            for k in sorted({1, available_cores()}):
                torch.set_num_threads(k)
                t0 = time.perf_counter()
                for d in data:
                    analyze_all(read_image(d, max_side=SCREEN_SIDE))
                out[k] = round(time.perf_counter() - t0, 2)
            return out
        finally:
            torch.set_num_threads(threads)


def _script_runs(samples: list[str], weights_dir=None) -> dict:
    """The server's side alone, without a browser: the upload page's script run for each sample (Streamlit's
    AppTest, in this process, through this process's shared service), one session after another and then all
    sessions at once from their own threads. Seconds: the sum one after another, and the wall time at once."""
    import threading
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parents[1] / "app.py")

    def opened():
        os.environ.setdefault("RETINA_MODE", "demo")     # the pages alone: no sign-in, nothing stored
        at = AppTest.from_file(app, default_timeout=300)
        at.run()
        return at

    with _weights_from(weights_dir):
        for s in samples[:2]:                                 # models loaded and warm
            opened().selectbox(key="sample").set_value(s).run()
        one_by_one = 0.0
        for s in samples:
            at = opened()
            t0 = time.perf_counter()
            at.selectbox(key="sample").set_value(s).run()
            one_by_one += time.perf_counter() - t0
        tests = [opened() for _ in samples]
        go, errors, ends = threading.Barrier(len(samples) + 1), [], []

        def run(at, s):
            go.wait()
            at.selectbox(key="sample").set_value(s).run()
            ends.append(time.perf_counter())
            errors.extend([str(e.value)[:200] for e in at.exception] +      # not the red "refer" suggestions
                          [e.value for e in at.error if BUSY_TEXT in str(e.value)])

        threads = [threading.Thread(target=run, args=(at, s)) for at, s in zip(tests, samples)]
        for t in threads:
            t.start()
        go.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join(600)
        return {"one_after_another_s": round(one_by_one, 2), "at_once_wall_s": round(max(ends) - t0, 2),
                "at_once_vs_one_after_another": round((max(ends) - t0) / one_by_one, 2), "errors": errors}


BUSY_TEXT = "retry in a few seconds"                  # the shared service's "busy" message
BROKEN_UPLOAD = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64   # a PNG signature and nothing after it


# Installed in a page before its request: a MutationObserver notes, in the page itself, when a result, an exception
# or the "busy" message first appears (epoch ms), so N pages are timed without polling each one from Python (which,
# on two loaded cores, took CPU from the server it measures). The check reads the whole page's text, so it runs at
# most once per 50 ms of DOM changes (the time noted is at most that late), not on every mutation of a rendering page.
_WATCH = """() => {
  window.__retinaOutcome = null;
  let pending = false;
  const check = () => {
    pending = false;
    if (window.__retinaOutcome) return;
    const text = document.body.textContent || "";
    const o = text.includes(%r) ? "result"
      : document.querySelector('[data-testid="stException"]') ? "exception"
      : text.includes(%r) ? "busy" : null;
    if (o) { window.__retinaOutcome = [o, Date.now() / 1000]; observer.disconnect(); }
  };
  const observer = new MutationObserver(() => { if (!pending) { pending = true; setTimeout(check, 50); } });
  observer.observe(document.body, {subtree: true, childList: true, characterData: true});
}""" % (RESULT_TEXT, BUSY_TEXT)


def _outcome(page, timeout_s: float) -> tuple[str, float] | None:
    """("result" | "exception" | "busy", epoch seconds it appeared) once the page shows one; None on timeout."""
    try:
        page.wait_for_function("() => window.__retinaOutcome !== null", timeout=max(1.0, timeout_s) * 1000,
                               polling=100)
    except Exception:     # playwright's TimeoutError
        return None
    o, t = page.evaluate("() => window.__retinaOutcome")
    return o, float(t)


def bench_concurrent_sessions(n: int = 8, weights_dir=None, disturb: bool = True) -> dict:
    """N browser sessions ask for a prediction at once (different bundled samples, fundus and OCT), through the
    server's shared inference service (`retina_core.serving`).

    Reports: how many finished with a result and how many showed an error ("busy" or an exception); the wall time
    from the first request to the last result on screen against the same N analyses back to back in this process
    (target <= 1.0x; the faster of 1 and all torch threads) and against the same N requests one at a time in one
    browser session on the warm server (pages drawn too); the server's side alone (`_script_runs`: the same
    requests as AppTest script runs, one after another and at once, no browser); each session's latency (selection to prediction on
    screen; p50 / p95 / max); the server's resident memory growth per session (target <= 40 MB: the models are one
    shared copy, a session adds its images and results). disturb: two more sessions fire right after the N, one
    uploading a broken file (it must show its own error) and one closed right after asking (its request must
    leave the queue); neither may delay or fail the others."""
    why = _missing()
    if why:
        return {"skipped": why}
    from playwright.sync_api import sync_playwright

    samples = [SAMPLES[i % len(SAMPLES)] for i in range(n)]
    back_to_back = [_analyses_back_to_back(samples, weights_dir)]
    scripts = _script_runs(samples, weights_dir)
    with sync_playwright() as p, app_server(weights_dir, env_extra=BENCH_ENV) as (url, proc):
        browser = launch(p)
        warm = browser.new_context().new_page()
        warm.goto(url)
        warm.get_by_text(DISCLAIMER_TEXT).first.wait_for(timeout=120000)
        _predict(warm, SAMPLES[0])                            # loads the OCT models
        wait_idle(warm)
        warm.reload()
        warm.get_by_text(DISCLAIMER_TEXT).first.wait_for(timeout=120000)
        _predict(warm, SAMPLES[1])                            # loads the fundus models
        wait_idle(warm)
        alone = []
        for s in samples:                                     # the same requests one at a time, one session alone
            warm.reload()
            warm.get_by_text(DISCLAIMER_TEXT).first.wait_for(timeout=120000)
            alone.append(_predict(warm, s))
            wait_idle(warm)
        rss0 = rss_mb(proc.pid)
        contexts = [browser.new_context() for _ in range(n + (2 if disturb else 0))]
        pages = [c.new_page() for c in contexts]
        for pg in pages:
            pg.goto(url)
        for pg in pages:
            pg.get_by_text(DISCLAIMER_TEXT).first.wait_for(timeout=120000)
        broken = pages[n] if disturb else None
        options = []
        for i, pg in enumerate(pages[:n]):                    # every sample list opened and filtered beforehand,
            pg.evaluate(_WATCH)                               # so firing is one click per session
            combo = pg.locator('[data-testid="stSelectbox"]').filter(has_text="bundled sample").first \
                .get_by_role("combobox")
            combo.click()
            combo.fill(samples[i])
            options.append(pg.get_by_role("option", name=samples[i]).first)
            options[-1].wait_for(timeout=60000)
        sampler = CpuSampler({"server": proc.pid, "browser_and_driver": os.getpid()}).__enter__()
        time.sleep(0.3)                                       # a snapshot before the first request
        starts = []
        for opt in options:                                   # fire every request before waiting for any
            opt.click()
            starts.append(time.time())
        if disturb:                                           # while the N are being served
            broken.locator('input[type="file"]').first.set_input_files(
                files=[{"name": "broken.png", "mimeType": "image/png", "buffer": BROKEN_UPLOAD}])
            choose(pages[n + 1], "bundled sample", SAMPLES[4], idle=False)
            contexts[n + 1].close()                           # the tab is gone while its request waits
        done: dict[int, float] = {}
        outcome: dict[int, str] = {}
        deadline = time.time() + 600
        for i, pg in enumerate(pages[:n]):                    # each page noted its own time; collect them
            got = _outcome(pg, deadline - time.time())
            if got:
                outcome[i], done[i] = got
        t_last = max(done.values(), default=time.time())
        time.sleep(0.3)                                       # a snapshot after the last result
        sampler.__exit__()
        t_first = starts[0]                                   # the first request sent (choose returns then)
        for pg in pages[:n + (1 if disturb else 0)]:
            wait_idle(pg)
        rss1 = rss_mb(proc.pid)
        broken_shown = None
        if disturb:
            broken_shown = broken.locator('[data-testid="stAlertContentError"]').count() > 0
        browser.close()
    back_to_back.append(_analyses_back_to_back(samples, weights_dir))   # again: the load may have changed
    lat = sorted(done[i] - starts[i] for i, o in outcome.items() if o == "result")
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else lat * 19
    per = (rss1 - rss0) / n
    wall = t_last - t_first
    seq = min(min(b.values()) for b in back_to_back)       # the best a single process did, before or after
    ok = sum(o == "result" for o in outcome.values())
    # where the machine's CPU went from the first request to the last result on screen (sampled every 0.25 s, so
    # the window is up to 0.5 s wider): the server process, and Chromium with Playwright's driver and this process
    # (its other children); on a clinic's network the browsers run on the clinicians' machines, so the server's
    # share is what the server machine must carry
    window, used = sampler.used(t_first, t_last)
    cpu = {"window_s": window, "cores": os.cpu_count(), "server_s": used["server"],
           "browsers_and_driver_s": used["browser_and_driver"],
           "server_vs_back_to_back": round(used["server"] / seq, 2) if seq else None}
    errors = {k: sum(o == k for o in outcome.values()) for k in ("busy", "exception")}
    return {"sessions": n, "completed": ok, "errors": errors, "no_outcome": n - len(outcome),
            "wall_s": round(wall, 2), "firing_s": round(starts[-1] - starts[0], 2), "back_to_back_s": round(seq, 2),
            "back_to_back_runs_s": back_to_back,            # [before, after] x {torch threads: seconds}
            "wall_vs_back_to_back": round(wall / seq, 2) if lat else None,
            "latency_p50_s": round(statistics.median(lat), 2) if lat else None,
            "latency_p95_s": round(q[18], 2) if lat else None, "latency_max_s": round(lat[-1], 2) if lat else None,
            "alone_latency_s": round(statistics.median(alone), 2),
            "one_at_a_time_in_browser_s": round(sum(alone), 2),   # the N requests one after another, one session
            "wall_vs_one_at_a_time": round(wall / sum(alone), 2) if lat else None,
            "server_scripts_without_browser": scripts, "cpu_in_window": cpu,
            "rss_before_mb": round(rss0, 1),
            "rss_after_mb": round(rss1, 1), "rss_per_session_mb": round(per, 1), "target_mb": 40,
            "disturbers": ({"broken_upload_showed_its_error": broken_shown, "closed_tab": True} if disturb
                           else None),
            "meets_target": ok == n and per <= 40 and bool(lat) and wall <= seq}
