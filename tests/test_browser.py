"""End to end in a real headless Chromium: start `streamlit run` on 127.0.0.1, use every page as a clinician would
(upload, bundled samples, buttons), download the PDF report, and save a screenshot of every page
(artifacts/screenshots/) to look at."""
import os
import time
from pathlib import Path

import pytest

from retina_core.browser import app_server, chromium_available, choose, launch, wait_idle

ROOT = Path(__file__).resolve().parents[1]
ART = ROOT / "artifacts" / "screenshots"

if not chromium_available():
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium (see .ci/run) for the browser test")
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from retina_core.testing import write_test_weights

    weights = write_test_weights(tmp_path_factory.mktemp("browser_weights"))   # bundled + random for the rest
    with app_server(weights, env_extra={"RETINA_MODE": "demo"}) as (url, _proc):   # pages only: no sign-in
        yield url


def shoot(page, name: str) -> Path:
    page.get_by_text("not a medical device").first.wait_for(timeout=120000)      # every page carries it
    wait_idle(page)
    assert page.locator('[data-testid="stException"]').count() == 0, f"exception on {name}"
    path = ART / f"{name}.png"
    # Streamlit scrolls inside its main container, so a "full page" shot would stop at the viewport: grow the
    # viewport to the content's height for the shot, then restore it.
    height = page.evaluate("() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
                           " return m ? m.scrollHeight : document.body.scrollHeight; }")
    page.set_viewport_size({"width": 1400, "height": int(min(max(height, 1000), 9000))})
    time.sleep(1.0)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})
    return path


def visit_every_page(page, url: str, oct_file: str, fundus_file: str) -> list[Path]:
    """Use every page with real inputs and screenshot it; returns the screenshots."""
    shots = []
    page.goto(url)
    wait_idle(page)
    shots.append(shoot(page, "upload_empty"))
    page.locator('input[type="file"]').first.set_input_files(oct_file)
    page.get_by_text("Calibrated probabilities").wait_for(timeout=240000)
    wait_idle(page)
    assert page.get_by_text("Strongest heatmap region").count() == 1
    shots.append(shoot(page, "upload"))

    page.goto(f"{url}/compare")
    wait_idle(page)
    choose(page, "Bundled paired phantom", "Paired phantom 1: diabetic eye (fundus + OCT)")
    page.get_by_text("Agreement").first.wait_for(timeout=240000)
    shots.append(shoot(page, "compare"))

    page.goto(f"{url}/zones")
    wait_idle(page)
    choose(page, "bundled sample", "Fundus phantom: moderate diabetic retinopathy")
    page.get_by_text("Stability under perturbation").wait_for(timeout=240000)
    wait_idle(page)
    shots.append(shoot(page, "zones"))

    page.goto(f"{url}/ensemble")
    wait_idle(page)
    choose(page, "bundled sample", "OCT phantom: choroidal neovascularisation (CNV)")
    shots.append(shoot(page, "ensemble"))

    page.goto(f"{url}/volume")
    wait_idle(page)
    choose(page, "bundled volume", "Volume phantom: diabetic macular oedema (DME)")
    page.get_by_text("En-face projection").first.wait_for(timeout=240000)
    shots.append(shoot(page, "volume"))

    page.goto(f"{url}/batch")
    wait_idle(page)
    page.locator('input[type="file"]').first.set_input_files([oct_file, fundus_file])
    wait_idle(page)
    page.get_by_role("button", name="Screen 2 image(s)").click()
    page.get_by_text("Download results (CSV)").wait_for(timeout=240000)
    wait_idle(page)
    shots.append(shoot(page, "batch"))

    page.goto(f"{url}/models")
    wait_idle(page)
    choose(page, "Model to evaluate", "oct_resnet18")
    page.get_by_role("button", name="Evaluate oct_resnet18").click()
    page.get_by_text("Reliability diagram").first.wait_for(timeout=240000)
    wait_idle(page)
    shots.append(shoot(page, "models"))
    return shots


def test_every_page_in_a_real_browser_with_report_download(server, oct_png, fundus_png, tmp_path):
    from playwright.sync_api import sync_playwright

    ART.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        shots = visit_every_page(page, server, str(oct_png), str(fundus_png))
        # The PDF report, built on click by the server, downloaded like a user does.
        page.goto(server)
        wait_idle(page)
        page.locator('input[type="file"]').first.set_input_files(str(fundus_png))
        page.get_by_text("Patient report (PDF)").wait_for(timeout=240000)
        wait_idle(page)
        with page.expect_download(timeout=120000) as info:
            page.get_by_role("button", name="Patient report (PDF)").click()
        pdf = Path(info.value.path()).read_bytes()
        browser.close()
    assert pdf[:4] == b"%PDF"
    assert len(shots) == 8 and all(s.stat().st_size > 10_000 for s in shots)
