"""End to end in a real headless Chromium: start `streamlit run` on 127.0.0.1, upload a phantom through the page,
wait for the prediction, and save a screenshot of every page (artifacts/screenshots/) to look at."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
ART = ROOT / "artifacts" / "screenshots"

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium (see .ci/run) for the browser test")
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                             "--server.address", "127.0.0.1", "--server.port", str(port),
                             "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("streamlit did not start within 120 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_idle(page, timeout_s=180):
    page.wait_for_selector('[data-testid="stApp"]', timeout=60000)
    end, quiet = time.time() + timeout_s, 0
    while time.time() < end and quiet < 4:
        quiet = quiet + 1 if page.locator('[data-testid="stStatusWidget"]').count() == 0 else 0
        time.sleep(0.5)


def test_upload_in_real_browser_and_screenshot_every_page(server, oct_png, tmp_path):
    from playwright.sync_api import sync_playwright

    ART.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS,)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server)
        _wait_idle(page)
        assert page.get_by_text("not a medical device").count() >= 1
        page.locator('input[type="file"]').first.set_input_files(str(oct_png))
        page.get_by_text("Calibrated probabilities").wait_for(timeout=180000)
        _wait_idle(page)
        assert page.get_by_text("Strongest heatmap region").count() == 1
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(ART / "upload.png"), full_page=True)
        for path, name in (("models", "models"),):
            page.goto(f"{server}/{path}")
            _wait_idle(page)
            assert page.locator('[data-testid="stException"]').count() == 0
            page.screenshot(path=str(ART / f"{name}.png"), full_page=True)
        browser.close()
    assert (ART / "upload.png").stat().st_size > 10_000
