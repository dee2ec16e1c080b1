"""The shared inference service (retina_core/serving.py): concurrent sessions get exactly what `analyze` gives,
in micro-batches, with bounded threads, a bounded queue that says "busy" at once, and failures that stay alone."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import retina_core.explain.attribution as attribution
from retina_core import analysis, serving
from retina_core.analysis import analyze, analyze_all, get_model
from retina_core.errors import RetinaInputError, ServerBusyError
from retina_core.io.decode import read_image
from retina_core.serving import BUSY, CpuShare, InferenceService, ServiceConfig, available_cores, threads_for

MODELS = ["oct_resnet18", "oct_dme_resnet18", "fundus_dr_effnet_b0"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")    # two threads on a busy 2-core machine: many times slower


@pytest.fixture(scope="module", autouse=True)
def weights(tmp_path_factory):
    """Three models (bundled weights where present, random otherwise), in a folder of their own."""
    from retina_core.testing import write_test_weights

    d = write_test_weights(tmp_path_factory.mktemp("serving_weights"), MODELS)
    saved = os.environ.get("RETINA_WEIGHTS_DIR")
    os.environ["RETINA_WEIGHTS_DIR"] = str(d)
    get_model.cache_clear()
    yield d
    if saved is None:
        os.environ.pop("RETINA_WEIGHTS_DIR", None)
    else:
        os.environ["RETINA_WEIGHTS_DIR"] = saved
    get_model.cache_clear()


@pytest.fixture(autouse=True)
def keep_threads():
    """Services set the process's thread pools; put them back for the other tests."""
    before, before_cv = torch.get_num_threads(), cv2.getNumThreads()
    yield
    torch.set_num_threads(before)
    cv2.setNumThreads(before_cv)


def _png(array) -> bytes:
    from retina_core.webapp.common import png_bytes

    return png_bytes(array)


@pytest.fixture(scope="module")
def octs():
    from retina_core.phantoms import oct_phantom

    return [read_image(_png(oct_phantom(c, seed=s, width=256, height=248).image))
            for c, s in [("CNV", 1), ("DME", 2), ("NORMAL", 3), ("DRUSEN", 4)]]


@pytest.fixture(scope="module")
def fundus():
    from retina_core.phantoms import fundus_phantom

    return read_image(_png(fundus_phantom("Moderate", seed=5, size=256).image))


@pytest.fixture
def service():
    made = []

    def make(**kw):
        svc = InferenceService(ServiceConfig(**{"threads": 1, **kw}))
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


def same(a, b):
    """Two Analyses agree: every field, probabilities and heatmaps within float tolerance."""
    assert (a.model, a.label, a.method, a.target, a.referable, a.suggestion, a.notes, a.content_hash) == \
        (b.model, b.label, b.method, b.target, b.referable, b.suggestion, b.notes, b.content_hash)
    assert a.probabilities.keys() == b.probabilities.keys()
    assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities) < 1e-5
    assert (a.heatmap is None) == (b.heatmap is None)
    if a.heatmap is not None:
        assert a.heatmap.shape == b.heatmap.shape and np.abs(a.heatmap - b.heatmap).max() < 1e-4


def in_threads(fn, items):
    """fn(item) for every item, each from its own thread, released together; results (or exceptions) in order."""
    out = [None] * len(items)
    go = threading.Barrier(len(items))

    def run(k):
        go.wait()
        try:
            out[k] = fn(items[k])
        except BaseException as exc:      # noqa: BLE001 - the test inspects it
            out[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_concurrent_sessions_get_what_analyze_gives_in_micro_batches(service, octs, fundus):
    svc = service(window_ms=1500, max_batch=4)   # a batch leaves when its 4 OCT images are in (or after 1.5 s)
    direct = [analyze_all(i) for i in octs] + [analyze_all(fundus)]
    got = in_threads(svc.analyze_all, [*octs, fundus])
    for d, g in zip(direct, got):
        assert not isinstance(g, BaseException), g
        assert [a.model for a in g] == [a.model for a in d] and all(a.has_result for a in g)
        for a, b in zip(d, g):
            same(a, b)
    s = svc.stats()
    assert s["completed"] == sum(len(d) for d in direct) and s["failed"] == s["rejected"] == 0
    assert s["max_batch_seen"] > 1 and s["batches"] < s["completed"], s     # batched, not one by one


def test_images_of_other_sizes_and_methods_are_not_mixed(service, octs):
    small = read_image(_png(octs[0].pixels[::2, ::2]))
    svc = service(window_ms=1500, max_batch=2)
    jobs = [(octs[1], "gradcam"), (small, "gradcam"), (octs[2], "gradcam"), (octs[3], "hirescam")]
    got = in_threads(lambda j: svc.analyze(j[0], "oct_resnet18", method=j[1]), jobs)
    for (img, method), g in zip(jobs, got):
        same(analyze(img, "oct_resnet18", method=method), g)
    assert svc.stats()["batch_sizes"].get(2) == 1      # only the two same-size Grad-CAM requests shared a batch


def test_other_model_work_runs_in_the_worker_in_turn_with_readings(service, octs):
    svc = service(window_ms=5)
    ran_in = []

    def job(x, scale=1):
        ran_in.append(threading.current_thread().name)
        return x * scale

    got = in_threads(lambda k: svc.call(job, k, scale=10) if k % 2 else svc.analyze(octs[k], "oct_resnet18"),
                     [0, 1, 2, 3])
    assert got[1] == 10 and got[3] == 30 and all(not isinstance(g, BaseException) for g in got)
    same(analyze(octs[0], "oct_resnet18"), got[0])
    assert set(ran_in) == {"retina-inference"}                  # the one worker thread, not the callers'
    with pytest.raises(ZeroDivisionError):                      # a job's error comes back to its caller ...
        svc.call(lambda: 1 / 0)
    assert svc.call(job, 2) == 2                                # ... and the worker goes on
    s = svc.stats()
    assert s["jobs"] == 4 and s["failed"] == 1


def test_the_volume_viewers_per_slice_pass_runs_batch_by_batch_in_the_worker(service):
    """`per_slice_2d(run=service.call)`: each batch of B-scans is one job on the worker thread, progress is reported
    between them, and the maps and probabilities equal the pass run in the caller."""
    from retina_core.models import load_model
    from retina_core.volume import per_slice_2d, phantom_volume

    svc = service(window_ms=5)
    model = load_model("oct_resnet18")
    vol = phantom_volume("disease", n_slices=10, size=64)[0]
    ran_in, done = [], []

    def run(job):
        return svc.call(lambda: (ran_in.append(threading.current_thread().name), job())[1])

    maps, probs = per_slice_2d(model, vol, batch_size=4, progress=done.append, run=run)
    ref_maps, ref_probs = per_slice_2d(model, vol, batch_size=4)
    assert ran_in == ["retina-inference"] * 3 and done == [0.4, 0.8, 1.0]
    assert maps.shape == (10, *vol.shape[1:]) and np.allclose(maps, ref_maps, atol=1e-5)
    assert np.allclose(probs, ref_probs, atol=1e-6) and svc.stats()["jobs"] == 3


def test_a_full_queue_says_busy_at_once(service, octs):
    svc = service(queue_size=2, window_ms=30_000)      # the worker waits for a batch to fill: the queue stays full
    first = []
    waiting = threading.Thread(target=lambda: first.extend(in_threads(svc.analyze_all, [octs[0]])))
    waiting.start()                                    # two readings (both OCT models) fill the queue
    deadline = time.time() + 30
    while svc.stats()["queued"] < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert svc.stats()["queued"] == 2
    t0 = time.perf_counter()
    with pytest.raises(ServerBusyError, match="busy; retry in a few seconds"):
        svc.analyze(octs[1], "oct_resnet18")
    assert time.perf_counter() - t0 < 2.0              # the gate runs first; no waiting for the queue
    assert isinstance(ServerBusyError(BUSY), RetinaInputError)   # pages show it like any input error
    assert svc.stats()["rejected"] == 1 and svc.stats()["queued"] == 2
    svc.close()                                        # queued readings fail with "busy" too
    waiting.join(10)
    assert not waiting.is_alive() and isinstance(first[0], ServerBusyError)


def test_a_timed_out_or_stopped_request_leaves_the_queue(service, octs):
    svc = service(window_ms=1500)
    t0 = time.perf_counter()
    with pytest.raises(ServerBusyError, match="did not finish in time"):
        svc.analyze(octs[0], "oct_resnet18", timeout=0.2)
    with pytest.raises(ServerBusyError, match="stopped"):
        svc.analyze(octs[1], "oct_resnet18", cancelled=lambda: True)
    assert time.perf_counter() - t0 < 1.5 and svc.stats()["queued"] == 0
    s = svc.stats()
    assert s["timed_out"] == 1 and s["stopped"] == 1
    same(analyze(octs[2], "oct_resnet18"), svc.analyze(octs[2], "oct_resnet18"))   # the next one is served
    assert svc.stats()["batch_sizes"] == {1: 1}        # the abandoned ones never ran


def test_a_bad_input_in_a_batch_fails_alone(service, octs, monkeypatch):
    bad = octs[3]
    real = attribution.explain_batch

    def flaky(model, images, method=None, target=None, **kw):     # a forward that breaks on one image
        if any(np.array_equal(im, bad.pixels) for im in images):
            raise RuntimeError("corrupt input tensor")
        return real(model, images, method, target, **kw)

    monkeypatch.setattr(attribution, "explain_batch", flaky)
    monkeypatch.setattr(analysis, "explain_batch", flaky)
    svc = service(window_ms=1500, max_batch=4)
    got = in_threads(lambda img: svc.analyze(img, "oct_resnet18"), octs)
    assert isinstance(got[3], RuntimeError)
    monkeypatch.setattr(analysis, "explain_batch", real)
    for img, g in zip(octs[:3], got[:3]):
        same(analyze(img, "oct_resnet18"), g)
    s = svc.stats()
    assert s["batch_retried"] >= 1 and s["failed"] == 1 and s["completed"] == 3


def test_threads_never_exceed_the_cores(service, monkeypatch, octs):
    assert ServiceConfig(threads=64).threads == available_cores()
    monkeypatch.delenv("RETINA_THREADS", raising=False)
    auto = ServiceConfig.from_env()
    assert auto.adaptive and auto.threads == available_cores()
    # adaptive: the cores other processes leave free, at least one (a 2-core machine with a training job: one)
    assert [threads_for(2, o) for o in (0.0, 0.4, 0.6, 1.0, 1.9, 3.5)] == [2, 2, 1, 1, 1, 1]
    assert threads_for(8, 2.2) == 6
    share = CpuShare()
    sum(i * i for i in range(200_000))                 # our own work is not "other processes"
    assert 0.0 <= share.others() <= available_cores() + 0.5
    monkeypatch.setenv("RETINA_THREADS", "1")
    monkeypatch.setenv("RETINA_QUEUE_SIZE", "5")
    cfg = ServiceConfig.from_env()
    assert (cfg.threads, cfg.queue_size, cfg.adaptive) == (1, 5, False)
    svc = service(threads=cfg.threads)
    svc.analyze(octs[0], "oct_resnet18")
    s = svc.stats()
    assert s["worker_torch_threads"] == 1 and s["threads"]["torch"] == 1 and s["threads"]["opencv"] == 1
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))   # threads started later inherit it
    t.start()
    t.join()
    assert seen == [1]


def test_get_service_is_one_local_service_by_default(monkeypatch):
    monkeypatch.delenv("RETINA_SERVE_ADDRESS", raising=False)
    serving.reset_service()
    try:
        svc = serving.get_service()
        assert svc is serving.get_service() and svc.backend == "local"
        assert svc.stats()["config"]["threads"] <= available_cores()
    finally:
        serving.reset_service()


def _ray_serve_missing() -> str | None:
    try:
        import ray.serve  # noqa: F401
    except Exception as exc:      # ray installed without its [serve] extras, or absent
        return f"Ray Serve unavailable: {exc}"
    return None


@pytest.mark.skipif(_ray_serve_missing() is not None, reason=str(_ray_serve_missing()))
def test_ray_serve_local_mode_gives_the_same_results_from_two_replicas(monkeypatch, octs, fundus):
    """RETINA_SERVE_REPLICAS=2 on a 2-CPU local Ray: two replicas of one thread each, every reading equal to the
    in-process one, the counters summed over both."""
    import ray
    from ray import serve

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RETINA_THREADS", raising=False)
    monkeypatch.setenv("RETINA_SERVE_ADDRESS", "local")
    monkeypatch.setenv("RETINA_SERVE_REPLICAS", "2")
    monkeypatch.setattr(serving, "available_cores", lambda: 2)      # the Ray it starts has 2 CPUs, one each
    serving.reset_service()
    try:
        svc = serving.get_service()
        assert svc.backend == "ray" and svc.config.replicas == 2 and svc.config.threads == 1
        got = in_threads(svc.analyze_all, [octs[0], octs[1], fundus])
        for img, g in zip([octs[0], octs[1], fundus], got):
            assert not isinstance(g, BaseException), g
            for a, b in zip(analyze_all(img), g):
                same(a, b)
        same(analyze(octs[2], "oct_resnet18"), svc.analyze(octs[2], get_model("oct_resnet18")))
        _input_error_comes_back_as_raised(svc, octs[2])
        s = svc.stats()
        assert s["backend"] == "ray" and s["replicas_running"] == 2 and s["replicas_reached"] == 2
        assert s["completed"] == 6 and s["failed"] == 0          # 2 + 2 + 1 readings, then 1, over both replicas
        assert sum(r["completed"] for r in s["per_replica"].values()) == 6
        assert s["config"]["threads"] == 1 and not s["config"]["adaptive"] and s["worker_torch_threads"] == 1
        assert s["deployed_here"] and serve.status().applications["retina"].status == "RUNNING"
    finally:
        serving.reset_service()
    assert not ray.is_initialized()       # "local": closing the service stops the Ray it started


def test_replicas_settings_and_a_cluster_too_small_for_them(monkeypatch):
    """One replica: the cores left free, adaptive (as before). Several: one thread each unless RETINA_THREADS says
    otherwise, reserved, not adaptive; more than the cluster's CPUs is refused before Serve would wait for ever."""
    import types

    monkeypatch.setattr(serving, "available_cores", lambda: 2)
    monkeypatch.delenv("RETINA_THREADS", raising=False)
    monkeypatch.delenv("RETINA_SERVE_REPLICAS", raising=False)
    one = ServiceConfig.from_env()
    assert (one.replicas, one.threads, one.adaptive) == (1, 2, True)
    monkeypatch.setenv("RETINA_SERVE_REPLICAS", "3")
    three = ServiceConfig.from_env()
    assert (three.replicas, three.threads, three.adaptive) == (3, 1, False)
    monkeypatch.setenv("RETINA_THREADS", "2")
    assert (ServiceConfig.from_env().threads, ServiceConfig.from_env().adaptive) == (2, False)
    fake_ray = types.SimpleNamespace(cluster_resources=lambda: {"CPU": 4.0})
    monkeypatch.setitem(__import__("sys").modules, "ray", fake_ray)
    with pytest.raises(RuntimeError, match="needs 6 CPUs; the Ray cluster has 4"):
        serving.deploy(ServiceConfig.from_env())


def _input_error_comes_back_as_raised(svc, img):
    """An input error in a replica reaches the caller as the project's RetinaInputError with its own message (what
    pages show), not as Ray's wrapper, whose text carries the replica's traceback."""
    with pytest.raises(RetinaInputError) as err:
        svc.analyze(img, "oct_resnet18", method="nonsense")
    assert type(err.value) is RetinaInputError and str(err.value).startswith("Unknown heatmap method 'nonsense'")
    assert "Traceback" not in str(err.value)


def test_a_wrong_cluster_address_fails_at_once(monkeypatch):
    """Nothing listening there, or not an address: a clear error at once (Ray itself retries for minutes)."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (closed,) = _free_ports(1)
    for address, message in ((f"127.0.0.1:{closed}", "No Ray cluster answers at 127.0.0.1"),
                             (f"ray://127.0.0.1:{closed}", "No Ray cluster answers at 127.0.0.1"),
                             ("headnode", "is not a Ray address")):
        monkeypatch.setenv("RETINA_SERVE_ADDRESS", address)
        serving.reset_service()
        with pytest.raises(RuntimeError, match=message):
            serving.get_service()
    assert not ray.is_initialized()
    from retina_core import cli

    assert cli.main(["serve", "--address", "local"]) == 2       # `serve` deploys onto a running cluster only
    assert cli.main(["serve", "--address", "auto", "--replicas", "0"]) == 2


PHI = ("DOE^JOHN", "PID-12345", "19450317", "St Elsewhere", "HOUSE^GREGORY", "ACC-998877", "20240102")


def _dicom_with_patient_fields(fundus) -> tuple[bytes, list[str]]:
    """A fundus photograph as DICOM with patient name, id, birth date, institution, physician, accession number and
    study date (tests/test_decode.py), and every value that would identify it (those, and its instance UIDs)."""
    import io

    import pydicom

    from tests.test_decode import dicom_bytes

    data = dicom_bytes(fundus.pixels, modality="OP")
    ds = pydicom.dcmread(io.BytesIO(data))
    return data, [*PHI, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]


def test_only_pixels_and_non_identifying_facts_cross_into_ray(fundus):
    """What `RayServeService` hands to Ray (its object store may spill to disk): no header field beyond the
    gate's non-identifying summary, whatever the source file or a caller's `meta` held."""
    import pickle

    from retina_core.io.decode import RetinalImage

    data, identifying = _dicom_with_patient_fields(fundus)
    img = read_image(data)
    sent = serving._for_replica(data)
    blob = pickle.dumps(sent)
    assert not [v for v in identifying if v.encode() in blob]
    assert np.array_equal(sent.pixels, img.pixels) and sent.content_hash == img.content_hash
    assert sent.meta == {"header": img.meta["header"]} and sent.laterality == "OS"
    tagged = RetinalImage(**{**vars(img), "meta": {**img.meta, "patient_name": "DOE^JOHN",
                                                    "header": {**img.meta["header"], "patient_id": "PID-12345"}}})
    blob = pickle.dumps(serving._for_replica(tagged))
    assert b"DOE^JOHN" not in blob and b"PID-12345" not in blob


# ------------------------------------------------------------------------------------------- a separate Ray cluster
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_members(sid: int) -> list[int]:
    """Processes of session `sid` (Linux /proc): the cluster's, whatever process group its workers moved to."""
    pids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                    pids.append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return pids


def _with_parent():
    """In the child before exec: a session of its own, and killed if the test process dies (Linux), so the
    cluster never outlives the tests; Ray's own processes follow their `ray start` (Ray's fate sharing)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def ray_cluster():
    """A real, separate one-node Ray cluster, as docs/app.md starts one: `ray start --head --block` on 127.0.0.1
    only, with its own temp folder and free ports, one CPU and a 200 MB object store. At the end its whole session
    is killed (its `ray start`, GCS, raylet, agents and workers), whatever the tests did; never `ray stop`, which
    stops every Ray on the machine. The cluster imports the retina_core under test (PYTHONPATH) and runs without
    RETINA_WEIGHTS_DIR / RETINA_AUDIT_LOG: the app forwards its own."""
    import retina_core

    if _ray_serve_missing():
        pytest.skip(_ray_serve_missing())
    cli = Path(sys.executable).with_name("ray")
    ray_cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
    tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))     # short: Ray's socket paths must fit in 107 bytes
    gcs, client, dashboard, agent, metrics_a, metrics_b = _free_ports(6)
    # Token authentication as this process has it: its environment, where Ray also records turning it on (a
    # "local" Ray does). A mismatch breaks one direction only (replicas stream results back to this process), so
    # calls would hang instead of failing.
    env = {**os.environ, serving.ONE_MACHINE_ENV: "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or "disabled",
           "DASHBOARD_METRIC_PORT": str(metrics_a), "AUTOSCALER_METRIC_PORT": str(metrics_b),
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(retina_core.__file__).parents[1]),
                                                     os.environ.get("PYTHONPATH")) if p)}
    for k in ("RETINA_WEIGHTS_DIR", "RETINA_AUDIT_LOG", "RAY_ADDRESS"):
        env.pop(k, None)
    log = tmp / "start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*ray_cmd, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                 "--port", str(gcs), "--ray-client-server-port", str(client),
                                 "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent),
                                 "--num-cpus", "1", "--object-store-memory", str(200 * 2**20),
                                 "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(tmp)],
                                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_with_parent)     # noqa: PLW1509 - setsid + death signal only
    try:
        deadline = time.monotonic() + 300                  # a bound on a broken start, not a timing check
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield SimpleNamespace(gcs=f"127.0.0.1:{gcs}", client=f"ray://127.0.0.1:{client}", temp_dir=tmp)
    finally:
        for pid in _session_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def other_weights(tmp_path, monkeypatch):
    """RETINA_WEIGHTS_DIR with a randomly initialised oct_resnet18 (the others bundled): a replica that did not get
    the app's folder reads the bundled oct_resnet18 and different probabilities."""
    from retina_core.testing import write_test_weights

    d = write_test_weights(tmp_path / "weights", ["oct_resnet18"], source=tmp_path / "none")
    write_test_weights(d, MODELS)
    monkeypatch.setenv("RETINA_WEIGHTS_DIR", str(d))
    get_model.cache_clear()
    yield d
    get_model.cache_clear()


def _cluster_session(monkeypatch, address: str, **env) -> serving.RayServeService:
    import ray

    assert not ray.is_initialized(), "a Ray session left open would be used instead of the cluster"
    monkeypatch.setenv("RETINA_SERVE_ADDRESS", address)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    serving.reset_service()
    svc = serving.get_service()
    assert isinstance(svc, serving.RayServeService)
    return svc


def test_ray_serve_on_a_separate_cluster_gives_the_same_results(ray_cluster, other_weights, monkeypatch, octs,
                                                                 fundus, tmp_path):
    import ray

    audit = tmp_path / "audit.jsonl"
    try:
        # "auto" with RAY_ADDRESS: Ray's own way to name a cluster
        svc = _cluster_session(monkeypatch, "auto", RAY_ADDRESS=ray_cluster.gcs, RETINA_AUDIT_LOG=str(audit))
        monkeypatch.delenv("RETINA_AUDIT_LOG")      # the replica got it at deployment; this process audits no more
        assert svc.deployed and svc.stats()["deployed_here"]
        got = in_threads(svc.analyze_all, [octs[0], octs[1], fundus])
        for img, g in zip([octs[0], octs[1], fundus], got):
            assert not isinstance(g, BaseException), g
            ref = analyze_all(img)
            assert [a.model for a in g] == [a.model for a in ref]
            for a, b in zip(ref, g):
                same(a, b)
        same(analyze(octs[2], "oct_resnet18"), svc.analyze(octs[2], get_model("oct_resnet18")))
        data, identifying = _dicom_with_patient_fields(fundus)
        served = svc.analyze(data)
        same(analyze(data), served)
        assert served.laterality == "OS" and served.model == "fundus_dr_effnet_b0"
        _input_error_comes_back_as_raised(svc, octs[3])
        s = svc.stats()
        assert s["backend"] == "ray" and s["address"] == "auto" and s["app"] == "retina"
        assert s["completed"] == 7 and s["failed"] == 0 and s["submitted"] == 7   # 2 + 2 + 1, then 1 and the DICOM
        lines = [json.loads(x) for x in audit.read_text().splitlines()]           # written by the replica
        assert len(lines) == 7 and read_image(data).content_hash in {x["content_hash"] for x in lines}
        # nothing identifying in what Ray keeps on disk: its logs, spilled objects, session files
        leaks = [f for f in ray_cluster.temp_dir.rglob("*") if f.is_file() and not f.is_symlink()
                 and any(v.encode() in f.read_bytes() for v in identifying)]
        assert not leaks
    finally:
        serving.reset_service()
    assert not ray.is_initialized()            # disconnected; the application stays on the cluster


def test_the_app_finds_the_application_deployed_on_the_cluster(ray_cluster, other_weights, monkeypatch, octs,
                                                                capsys):
    """Every address form joins the same application by name: its counters go on, nothing is redeployed; the
    `serve` command deploys it (or shows it) before an app starts, and `--redeploy` replaces it."""
    import ray

    from retina_core import cli

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        first = _cluster_session(monkeypatch, ray_cluster.gcs)          # "host:port": the head's GCS port
        before = first.stats()["completed"]
        same(analyze(octs[0], "oct_resnet18"), first.analyze(octs[0], "oct_resnet18"))
        serving.reset_service()
        assert not ray.is_initialized()
        again = _cluster_session(monkeypatch, ray_cluster.client)       # "ray://host:port": Ray Client
        assert not again.deployed
        same(analyze(octs[1], "oct_resnet18"), again.analyze(octs[1], "oct_resnet18"))
        s = again.stats()
        assert s["completed"] == before + 2 and not s["deployed_here"]   # the same replica, still counting
    finally:
        serving.reset_service()
    assert cli.main(["serve", "--address", ray_cluster.gcs]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["completed"] == before + 2 and not shown["deployed_here"] and shown["app"] == "retina"
    assert cli.main(["serve", "--address", ray_cluster.gcs, "--redeploy"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["deployed_here"] and shown["completed"] == 0                # a new replica
    assert not ray.is_initialized()


def test_a_ray_client_connection_is_retried_when_the_head_fails_to_start_its_server(monkeypatch):
    """Ray Client starts a server process per connection on the head; on a busy head that start can fail once
    ("Starting Ray client server failed") and work a moment later. Other addresses fail at once."""
    import ray

    calls = []

    def init(address, **kw):
        calls.append(address)
        if len(calls) == 1:
            raise ConnectionAbortedError("Initialization failure from server: Starting Ray client server failed")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(serving, "_cluster_endpoint", lambda address: None)
    monkeypatch.setattr(serving.time, "sleep", lambda s: None)
    serving._join_cluster("ray://127.0.0.1:10001")
    assert calls == ["ray://127.0.0.1:10001"] * 2
    calls.clear()
    with pytest.raises(ConnectionAbortedError):
        serving._join_cluster("127.0.0.1:6379")
    assert len(calls) == 1
