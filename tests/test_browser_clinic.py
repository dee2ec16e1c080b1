"""The clinic end to end in a real headless Chromium, as a clinician does it: sign in, upload an OCT B-scan (a
phantom), save it to the worklist, open the case, agree and sign, download the FHIR report, sign out, sign back in
and find the signed case on the worklist. Screenshots go to artifacts/screenshots/clinic_*.png."""
import json
import os
import time
from pathlib import Path

import pytest

from retina_core.browser import app_server, chromium_available, launch, wait_idle

ROOT = Path(__file__).resolve().parents[1]
ART = ROOT / "artifacts" / "screenshots"
PASSWORD = "browser passphrase 42"

if not chromium_available():
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium (see .ci/run) for the browser test")
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def clinic_server(tmp_path_factory):
    """A dev-mode server on a temporary clinic database holding one clinician account."""
    from retina_core.clinic import ClinicConfig, accounts, open_clinic
    from retina_core.testing import write_test_weights

    data = tmp_path_factory.mktemp("browser_clinic")
    weights = write_test_weights(tmp_path_factory.mktemp("browser_clinic_weights"), ["oct_resnet18"])
    clinic = open_clinic(ClinicConfig("dev", data, f"sqlite:///{data / 'retina.db'}"))
    accounts.create_user(clinic, "dr-browser", PASSWORD, roles=["clinician"], display_name="Dr Browser")
    env = {"RETINA_MODE": "dev", "RETINA_DATA_DIR": str(data), "RETINA_DATABASE_URL": ""}
    with app_server(weights, env_extra=env) as (url, _proc):
        yield url, clinic
    clinic.dispose()


def sign_in(page, user: str, password: str) -> None:
    page.get_by_role("textbox", name="User name").fill(user)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Signed in as").first.wait_for(timeout=120000)
    wait_idle(page)


def shot(page, name: str) -> None:
    ART.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ART / f"clinic_{name}.png"), full_page=True)


def test_sign_in_upload_review_sign_out_and_find_the_signed_case(clinic_server, oct_png, tmp_path):
    from playwright.sync_api import sync_playwright

    from retina_core.clinic import records

    url, clinic = clinic_server
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
        page.goto(url)
        page.get_by_role("button", name="Sign in").wait_for(timeout=120000)
        assert page.get_by_text("Upload & diagnose").count() == 0          # nothing but the sign-in page
        page.get_by_role("textbox", name="User name").fill("dr-browser")
        page.get_by_role("textbox", name="Password").fill("not the password")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Wrong user name or password").wait_for(timeout=60000)
        shot(page, "sign_in")
        sign_in(page, "dr-browser", PASSWORD)

        page.locator('input[type="file"]').first.set_input_files(str(oct_png))
        page.get_by_text("Calibrated probabilities").wait_for(timeout=240000)
        wait_idle(page)
        page.get_by_text("Save to worklist").first.click()
        ref = page.get_by_role("textbox", name="Case reference (pseudonym)")
        ref.fill("BR-0001")
        ref.press("Enter")
        wait_idle(page)
        page.get_by_role("button", name="Save to worklist").click()
        page.get_by_text("Saved to case").wait_for(timeout=60000)
        wait_idle(page)
        page.get_by_text("Open the case for review").click()
        page.get_by_text("Case BR-0001").wait_for(timeout=60000)
        wait_idle(page)
        page.get_by_text("Agree", exact=True).first.click()
        page.get_by_text("Sign: a signed review cannot be changed").first.click()
        page.get_by_role("button", name="Save review").first.click()
        page.get_by_text("saved and signed").wait_for(timeout=60000)
        wait_idle(page)
        page.get_by_text("· signed").first.click()                      # a signed suggestion's panel is folded
        wait_idle(page)
        with page.expect_download(timeout=120000) as info:
            page.get_by_role("button", name="FHIR R4 report").first.click()
        fhir = json.loads(Path(info.value.path()).read_text())
        shot(page, "case_signed")

        page.get_by_role("button", name="Sign out").first.click()
        page.get_by_role("button", name="Sign in").wait_for(timeout=60000)
        assert page.get_by_text("Case review").count() == 0
        sign_in(page, "dr-browser", PASSWORD)
        page.get_by_role("link", name="Worklist").click()
        page.get_by_text("Open a case").wait_for(timeout=60000)
        wait_idle(page)
        time.sleep(1.0)
        shot(page, "worklist")
        picker = page.locator('[data-testid="stSelectbox"]').filter(has_text="Open a case").first
        shown = picker.get_by_role("combobox").input_value()
        assert "BR-0001 · reviewed" in shown, shown                        # the case picker, newest first
        page.get_by_role("button", name="Open case").click()
        page.get_by_text("Case BR-0001").wait_for(timeout=60000)
        wait_idle(page)
        page.get_by_text("· signed").first.click()
        page.get_by_text("signed: agree").first.wait_for(timeout=60000)
        shot(page, "case_after_sign_in_again")
        browser.close()

    assert fhir["resourceType"] == "Bundle"
    report = next(e["resource"] for e in fhir["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert report["status"] == "final"                                       # signed before the download
    (row,) = [r for r in records.worklist(clinic) if r.ref == "BR-0001"]
    assert row.status == "reviewed" and row.reviewers == ("Dr Browser",)
    actions = {e["action"] for e in records.audit_trail(clinic, actor="dr-browser")}
    assert {"login", "login.fail", "view.page", "analysis.run", "reading.save", "view.case", "review.sign",
            "export_results", "logout", "view.worklist"} <= actions, actions
