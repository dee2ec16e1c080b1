"""Two app sessions in one server process share the model copy but never each other's images or results."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def test_two_sessions_never_see_each_others_results(oct_png, fundus_png):
    first, second = AppTest.from_file(APP, default_timeout=240), AppTest.from_file(APP, default_timeout=240)
    first.run()
    second.run()
    first.file_uploader(key="upload").set_value((oct_png.name, oct_png.read_bytes(), "image/png")).run()
    second.file_uploader(key="upload").set_value((fundus_png.name, fundus_png.read_bytes(), "image/png")).run()
    first.run()   # a rerun after the other session worked
    assert not first.exception and not second.exception
    m1 = {m.label: m.value for m in first.metric}
    m2 = {m.label: m.value for m in second.metric}
    assert m1["Modality"] == "oct" and m2["Modality"] == "fundus"
    hashes1 = {k[0] for k in first.session_state["_analyses"]}
    hashes2 = {k[0] for k in second.session_state["_analyses"]}
    assert len(hashes1) == len(hashes2) == 1 and hashes1.isdisjoint(hashes2)
    text2 = "\n".join(str(e.value) for e in [*second.markdown, *second.caption, *second.subheader])
    assert oct_png.name not in text2 and next(iter(hashes1))[:16] not in text2


def test_a_busy_server_says_retry_and_a_failed_upload_leaves_other_sessions_alone(oct_png, monkeypatch):
    """A full queue shows "busy, retry" like any input error (no traceback); a session whose upload is broken
    fails alone while another session is served; once the queue has room again the same upload succeeds."""
    from retina_core import serving
    from retina_core.errors import ServerBusyError

    real = serving.get_service()

    class Full:                       # what a full queue answers: refused at once
        backend = "local"

        def analyze(self, *a, **kw):
            raise ServerBusyError(serving.BUSY)

        analyze_all = analyze

    monkeypatch.setattr(serving, "_SERVICE", Full())
    busy = AppTest.from_file(APP, default_timeout=240)
    busy.run()
    busy.file_uploader(key="upload").set_value((oct_png.name, oct_png.read_bytes(), "image/png")).run()
    assert not busy.exception
    assert [e.value for e in busy.error] == [serving.BUSY]
    assert not busy.session_state["_analyses"]          # nothing cached: a retry analyses again
    monkeypatch.setattr(serving, "_SERVICE", real)
    broken, fine = AppTest.from_file(APP, default_timeout=240), AppTest.from_file(APP, default_timeout=240)
    broken.run()
    fine.run()
    broken.file_uploader(key="upload").set_value(("scan.png", b"\x89PNG\r\n\x1a\n truncated", "image/png")).run()
    fine.file_uploader(key="upload").set_value((oct_png.name, oct_png.read_bytes(), "image/png")).run()
    busy.run()                                          # the retry, now that the queue has room
    assert not broken.exception and not fine.exception and not busy.exception
    assert len(broken.error) == 1 and "Traceback" not in broken.error[0].value
    assert {m.label: m.value for m in fine.metric}["Modality"] == "oct"
    assert {m.label: m.value for m in busy.metric}["Modality"] == "oct" and not busy.error


def test_a_closed_session_is_seen_by_the_service_while_it_waits(monkeypatch):
    """`webapp.common._session_stopped` (polled while a session waits for the service) turns true on Streamlit's STOP request
    (tab closed, session shut down), not on a rerun request (the result is still wanted then)."""
    from types import SimpleNamespace

    from streamlit.runtime.scriptrunner_utils import script_run_context
    from streamlit.runtime.scriptrunner_utils.script_requests import RerunData, ScriptRequests

    from retina_core.webapp import common

    requests = ScriptRequests()
    monkeypatch.setattr(script_run_context, "get_script_run_ctx",
                        lambda *a, **k: SimpleNamespace(script_requests=requests))
    stopped = common._session_stopped()
    assert stopped() is False
    requests.request_rerun(RerunData())
    assert stopped() is False
    requests.request_stop()
    assert stopped() is True
    monkeypatch.setattr(script_run_context, "get_script_run_ctx", lambda *a, **k: None)
    assert common._session_stopped() is None            # outside a script run: nothing to poll


def test_cpu_accounting_splits_the_machine_by_process_tree():
    """What `bench --only concurrent_sessions` reports as the server's and the browsers' CPU: a busy child's
    seconds land in its own group, not in its parent's."""
    import os
    import subprocess
    import sys

    from retina_core.browser import CpuSampler, cpu_by_group, cpu_used

    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nsys.stdout.write('go\\n'); sys.stdout.flush()\n"
                              "t = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
                              "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()                       # started: the busy loop runs from here
        groups = {"child": child.pid, "me": os.getpid()}
        before = cpu_by_group(groups)
        assert child.pid in before["child"] and child.pid not in before["me"]
        import time
        with CpuSampler(groups, interval_s=0.1) as sampler:
            t0 = time.time()
            time.sleep(1.0)                           # the child spins; this process sleeps
            t1 = time.time()
            time.sleep(0.2)
        used = cpu_used(before, cpu_by_group(groups))
        window, sampled = sampler.used(t0, t1)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert used["child"] >= 0.3 and used["me"] < 0.3
    assert 1.0 <= window <= 1.3 and sampled["child"] >= 0.3 and sampled["me"] < 0.3
