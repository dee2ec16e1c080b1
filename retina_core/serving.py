"""One inference service per server process, shared by every app session: a bounded queue, one worker thread that
runs the models, micro-batches of concurrent requests, bounded threads, and a clear "busy, retry" when full.

    >>> svc = get_service()                                   # the process's one service (created on first use)
    >>> a = svc.analyze(img, "oct_resnet18", method=None, modality=None, timeout=60)   # an Analysis, as `analyze`
    >>> found = svc.analyze_all(img)                          # as `analyze_all`
    >>> fr = svc.call(run_fusion, fusion, f_px, o_px)          # other model work, in the same queue and worker
    >>> svc.stats()                                           # queue depth, batch sizes, threads, rejections

Why: sessions that each call `analyze` run their own forward in their own script thread, each with every torch
thread (OpenMP gives each calling thread its own team): on a 2-core server four sessions ran eight busy threads
(docs/benchmarks.md: p95 2.14 s at once against 0.21 s alone), and forwards of the one shared model from several
threads at once can see each other's Grad-CAM hooks (seen here as torch's "differentiated Tensor ... appears to not
have been used in the graph" with four threads). Here the quality gate and the planning (`analysis.plan_analysis` / `plan_all`) run
in the caller's thread, and only the forward + heatmap go to the queue: the worker takes the oldest request and
every queued request with the same model, method, target and image size (waiting up to a few ms for more when
the queue is short), runs them as one `explain_batch`, and finishes each (`analysis.finish_reading`), so a batched
result is the one-by-one result (tests/test_serving.py). A batch that raises is rerun one by one, so a bad input
fails alone. A full queue refuses at once with `ServerBusyError` ("The server is busy; retry in a few seconds"); a
wait that runs out, or whose session stopped, gives up its place.

`analyze` / `analyze_all` (retina_core.analysis) stay the direct library API for researchers and the CLI; the
app's pages reach this service through `webapp.common.analysis_for` / `analyses_for`, and their other model work
(the fusion model and its maps, the 3-D volume model, its maps and Shapley values, the explainer comparison and
perturbation maps of *Attention zones*) through `webapp.common.served` -> `call`: a job runs alone in the worker, in
turn with the readings, so every forward of the server shares one bounded queue and one thread cap. (Through Ray
Serve, jobs run in the app's process: the replicas serve readings by model name.) Not yet through it: the volume
viewer's optional per-slice B-scan pass, which reports progress to the page from the session's own thread.

Settings (environment, read when the service starts):
    RETINA_THREADS          torch / OpenCV threads; default "auto": the CPUs this process may use, less those other
                            processes keep busy (re-measured each second), never more than the CPUs
    RETINA_QUEUE_SIZE       readings waiting at most (default 64: a few seconds of work) before "busy"
    RETINA_BATCH_WINDOW_MS  how long an idle worker waits for more requests to batch (default 5 ms)
    RETINA_MAX_BATCH        images in one batch at most (default 8)
    RETINA_TIMEOUT_S        how long a caller waits for its result (default 120 s)
    RETINA_SERVE_ADDRESS    forward to a Ray Serve application instead ("local": start Ray in this process;
                            "auto", "host:port" or "ray://host:10001": a running cluster). Unset (the default):
                            in-process.
    RETINA_SERVE_REPLICAS   replicas of the Ray Serve deployment (default 1, which uses the cores its machine leaves
                            free). Several: each reserves RETINA_THREADS CPUs of the cluster (default 1) and runs
                            that many threads, so Ray places them where CPUs are free, on any machine of the cluster.

Ray Serve (`RayServeService`): the application "retina" has one deployment whose replicas each hold an
`InferenceService`; the app reaches it through handles (no HTTP proxy). On a running cluster it is found by name and
used as it is, or deployed when there is none (`python -m retina_core serve --address ADDR` deploys it, or
`--redeploy`s it, before an app starts); closing the service disconnects this process and leaves the application
running for the app's other processes. The replicas import the retina_core installed on the cluster's machines and
read the app's RETINA_WEIGHTS_DIR and RETINA_AUDIT_LOG (forwarded when set). What crosses into Ray, whose object
store may spill to disk: pixels and non-identifying facts only (`_for_replica`). The cluster and the app must agree
on Ray's token authentication (RAY_AUTH_MODE): a cluster with a token refuses an app without; an app with one joins a
cluster without, but (Ray 2.60) the replicas' replies never reach it. Commands for a one-machine cluster on
127.0.0.1, and what is tested: docs/app.md ("Serving on a Ray cluster").
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from typing import Callable, TypeVar


from .analysis import Analysis, Reading, plan_all, plan_analysis, run_reading, run_readings
from .errors import RetinaInputError, ServerBusyError

T = TypeVar("T")

log = logging.getLogger(__name__)

BUSY = "The server is busy; retry in a few seconds."
TIMED_OUT = "The server is busy and this analysis did not finish in time; retry in a few seconds."
STOPPED = "The analysis was stopped before it finished; run it again."
POLL_S = 0.1        # how often a waiting caller checks whether its session stopped


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota where one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(float(quota) / float(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _env_number(name: str, default: float, cast=int):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return cast(raw)
    except ValueError:
        log.warning("ignoring %s=%r (not a number); using %s", name, raw, default)
        return default


@dataclass(frozen=True)
class ServiceConfig:
    """threads: torch intra-op and OpenCV threads at most (clamped to `available_cores`); queue_size: readings
    that may wait; window_ms: how long an idle worker waits for a batch to fill; max_batch: images per batch;
    timeout_s: how long a caller waits for its result; adaptive: before each batch (at most once a second) the
    worker runs on the cores other processes leave free, between 1 and `threads` (RETINA_THREADS unset or
    "auto"; a number fixes it); replicas: of the Ray Serve deployment (`application`), each holding a service
    with these settings (with several, each reserves `threads` CPUs and is not adaptive)."""

    threads: int
    queue_size: int = 64
    window_ms: float = 5.0
    max_batch: int = 8
    timeout_s: float = 120.0
    adaptive: bool = False          # use fewer threads while other processes keep cores busy (`threads_for`)
    replicas: int = 1

    def __post_init__(self):
        object.__setattr__(self, "threads", max(1, min(int(self.threads), available_cores())))
        object.__setattr__(self, "queue_size", max(1, int(self.queue_size)))
        object.__setattr__(self, "max_batch", max(1, int(self.max_batch)))
        object.__setattr__(self, "window_ms", max(0.0, float(self.window_ms)))
        object.__setattr__(self, "replicas", max(1, int(self.replicas)))
        if self.replicas > 1:
            object.__setattr__(self, "adaptive", False)     # a replica runs on the CPUs it reserved

    @classmethod
    def from_env(cls, replicas: int | None = None) -> "ServiceConfig":
        """The settings from the environment (module docstring); replicas: instead of RETINA_SERVE_REPLICAS."""
        fixed = os.environ.get("RETINA_THREADS", "auto").strip().lower() not in ("", "auto")
        replicas = _env_number("RETINA_SERVE_REPLICAS", 1) if replicas is None else replicas
        auto = available_cores() if replicas <= 1 else 1
        return cls(threads=_env_number("RETINA_THREADS", auto) if fixed else auto,
                   adaptive=not fixed, replicas=replicas,
                   queue_size=_env_number("RETINA_QUEUE_SIZE", 64),
                   window_ms=_env_number("RETINA_BATCH_WINDOW_MS", 5.0, float),
                   max_batch=_env_number("RETINA_MAX_BATCH", 8),
                   timeout_s=_env_number("RETINA_TIMEOUT_S", 120.0, float))


def bound_threads(n: int) -> dict:
    """Set the process's native thread pools to n threads: torch intra-op (inherited by threads started later),
    torch inter-op (lowered to n where it is larger and not yet started) and OpenCV's pool (the quality gate's
    filters and the heatmap warps). Returns what is in force."""
    import cv2
    import torch

    torch.set_num_threads(n)
    if torch.get_num_interop_threads() > n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:
            pass                              # already started: it can be set once per process, before first use
    cv2.setNumThreads(n)
    return {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
            "opencv": cv2.getNumThreads()}


def threads_for(cores: int, others: float) -> int:
    """Threads that fit on `cores` while other processes keep `others` cores busy (measured): at least one.
    OpenMP teams wait for their slowest thread, so a thread that has to share its core with another process
    stalls the whole forward: measured on this project's 2-core machine with a training job running, an
    `analyze_all` took 2.0-3.7 s on two threads and 0.11-0.15 s on one."""
    return max(1, min(cores, int(cores - others + 0.5)))


class CpuShare:
    """How many of this process's CPUs other processes kept busy since the last call, in cores (Linux /proc:
    busy time of the CPUs in our affinity mask minus this process's own CPU time). 0.0 where /proc is missing."""

    def __init__(self):
        try:
            self._cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self._cpus = None
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._read()

    def _read(self):
        try:
            busy = 0
            with open("/proc/stat") as f:
                for line in f:
                    name, *vals = line.split()
                    if name.startswith("cpu") and name != "cpu" and (self._cpus is None or name in self._cpus):
                        v = [int(x) for x in vals[:8]]
                        busy += sum(v) - v[3] - v[4]           # all but idle and iowait
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return time.monotonic(), busy, int(fields[11]) + int(fields[12])   # utime + stime
        except (OSError, ValueError, IndexError):
            return None

    def others(self) -> float:
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[0] - last[0] <= 0:
            return 0.0
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / self._hz / (now[0] - last[0]))


@dataclass
class _Request:
    reading: Reading | None
    future: Future
    key: tuple
    queued_at: float
    job: Callable[[], object] | None = None      # model work other than a reading (`InferenceService.call`)


def _batch_key(r: Reading) -> tuple:
    """Readings that can share one `explain_batch`: the same model object, method, target and image size."""
    px = r.img.pixels
    return id(r.model), r.method, r.target, px.shape, str(px.dtype)


class InferenceService:
    """In-process service: callers plan (gate, model, method) in their own thread and queue the forward; one
    worker thread runs the queue in micro-batches. Thread-safe; one per process (`get_service`)."""

    backend = "local"

    def __init__(self, config: ServiceConfig | None = None):
        self.config = config or ServiceConfig.from_env()
        self.threads = bound_threads(self.config.threads)
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._closed = False
        self._counts: Counter = Counter()
        self._batch_sizes: Counter = Counter()
        self._worker_threads: int | None = None
        self._others: float | None = None           # cores other processes kept busy (adaptive threads)
        self._worker = threading.Thread(target=self._work, name="retina-inference", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------- public API
    def analyze(self, image, model=None, method: str | None = None, modality: str | None = None,
                target: str | int | None = None, timeout: float | None = None,
                cancelled: Callable[[], bool] | None = None) -> Analysis:
        """`analysis.analyze` through the queue: the same Analysis. Raises RetinaInputError as `analyze` does and
        ServerBusyError when the queue is full, the wait runs past `timeout` (default RETINA_TIMEOUT_S) or
        `cancelled()` turns true while waiting (the session went away)."""
        return self._run([plan_analysis(image, model, method, target, modality)], timeout, cancelled)[0]

    def analyze_all(self, image, method: str | None = None, modality: str | None = None,
                    timeout: float | None = None, cancelled: Callable[[], bool] | None = None) -> list[Analysis]:
        """`analysis.analyze_all` through the queue (its readings are queued together, or refused together)."""
        return self._run(plan_all(image, method, modality), timeout, cancelled)

    def call(self, fn: Callable[..., T], *args, timeout: float | None = None,
             cancelled: Callable[[], bool] | None = None, **kwargs) -> T:
        """Run other model work through the same queue and worker as the readings (the fusion model, a 3-D
        volume model and its maps, explainer comparisons, Shapley values...): `fn(*args, **kwargs)` runs alone in
        the worker thread, under its thread cap, in turn with the readings, so every forward in the server shares
        one bounded queue. Its result or exception comes back; ServerBusyError as for `analyze`."""
        job = functools.partial(fn, *args, **kwargs)
        req = self._submit([_Request(None, Future(), ("job", id(job)), time.monotonic(), job)])
        return self._wait(req, self.config.timeout_s if timeout is None else timeout, cancelled)[0]

    def stats(self) -> dict:
        """Counters since start: readings submitted / completed / failed, refused as busy, timed out, stopped;
        batches run and their sizes; the queue now; the settings and threads in force."""
        with self._cond:
            sizes = dict(sorted(self._batch_sizes.items()))
            n_batches = sum(sizes.values())
            return {"backend": self.backend, **{k: int(self._counts[k]) for k in COUNTERS},
                    "batches": n_batches, "batch_sizes": sizes,
                    "mean_batch": round(sum(k * v for k, v in sizes.items()) / n_batches, 2) if n_batches else 0.0,
                    "max_batch_seen": max(sizes, default=0), "queued": len(self._pending),
                    "config": asdict(self.config), "threads": dict(self.threads),
                    "worker_torch_threads": self._worker_threads,
                    "other_processes_cores": None if self._others is None else round(self._others, 2)}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; readings still queued fail with ServerBusyError."""
        with self._cond:
            self._closed = True
            left, self._pending = self._pending, []
            self._cond.notify_all()
        for r in left:
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(ServerBusyError(BUSY))
        self._worker.join(timeout)

    # ------------------------------------------------------------------------------------------- callers
    def _run(self, plans: list, timeout: float | None, cancelled) -> list[Analysis]:
        now = time.monotonic()
        readings = [p for p in plans if isinstance(p, Reading)]
        requests = self._submit([_Request(r, Future(), _batch_key(r), now) for r in readings]) if readings else []
        done = iter(self._wait(requests, self.config.timeout_s if timeout is None else timeout, cancelled))
        return [next(done) if isinstance(p, Reading) else p for p in plans]

    def _submit(self, reqs: list[_Request]) -> list[_Request]:
        """Queue readings (refused together when they do not all fit) or a job."""
        with self._cond:
            if self._closed or len(self._pending) + len(reqs) > self.config.queue_size:
                self._counts["rejected"] += len(reqs)
                raise ServerBusyError(BUSY)
            self._pending.extend(reqs)
            self._counts["submitted"] += len(reqs)
            self._counts["jobs"] += sum(r.job is not None for r in reqs)
            self._cond.notify_all()
        return reqs

    def _wait(self, reqs: list[_Request], timeout: float, cancelled) -> list[Analysis]:
        deadline = time.monotonic() + timeout
        out = []
        for r in reqs:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._give_up(reqs, "timed_out")
                    raise ServerBusyError(TIMED_OUT)
                try:
                    out.append(r.future.result(timeout=min(left, POLL_S) if cancelled else left))
                    break
                except FutureTimeout:
                    if cancelled is not None and _safe_call(cancelled):
                        self._give_up(reqs, "stopped")
                        raise ServerBusyError(STOPPED) from None
        return out

    def _give_up(self, reqs: list[_Request], why: str) -> None:
        """A caller stopped waiting: its queued readings leave the queue (those already running finish unseen)."""
        with self._cond:
            gone = {id(r) for r in reqs}
            self._pending = [p for p in self._pending if id(p) not in gone]
            self._counts[why] += 1
        for r in reqs:
            r.future.cancel()

    # ------------------------------------------------------------------------------------------- worker
    def _work(self) -> None:
        import torch

        torch.set_num_threads(self.config.threads)      # this thread's OpenMP team: the only one running models
        self._worker_threads = torch.get_num_threads()
        share, checked = CpuShare(), time.monotonic()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if self.config.adaptive and time.monotonic() - checked >= 1.0:
                self._others = share.others()
                checked = time.monotonic()
                n = threads_for(self.config.threads, self._others)
                if n != self._worker_threads:
                    torch.set_num_threads(n)
                    self._worker_threads = n
            try:
                self._run_batch(batch)
            except BaseException as exc:   # never let the worker die: fail this batch, serve the next
                log.exception("inference batch failed")
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)

    def _next_batch(self) -> list[_Request] | None:
        """The oldest queued reading and every queued one with the same key (up to max_batch), after waiting up to
        window_ms from the oldest one's arrival for more to come."""
        cfg = self.config
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = self._pending[0]
                same = [r for r in self._pending if r.key == first.key][:cfg.max_batch]
                wait = first.queued_at + cfg.window_ms / 1000.0 - time.monotonic()
                if first.job is not None or len(same) >= cfg.max_batch or wait <= 0:     # a job runs alone
                    taken = {id(r) for r in same}
                    self._pending = [r for r in self._pending if id(r) not in taken]
                    return same
                self._cond.wait(wait)

    def _run_batch(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        if live[0].job is not None:
            self._run_job(live[0])
            return
        with self._cond:
            self._batch_sizes[len(live)] += 1
        try:
            results = run_readings([r.reading for r in live]) if len(live) > 1 else None
        except Exception:
            log.warning("a batch of %d failed; running its readings one by one", len(live), exc_info=True)
            with self._cond:
                self._counts["batch_retried"] += 1
            results = None
        for i, r in enumerate(live):
            self._settle(r, (lambda i=i: results[i]) if results is not None else (lambda r=r: run_reading(r.reading)))

    def _run_job(self, r: _Request) -> None:
        self._settle(r, r.job)

    def _settle(self, r: _Request, compute: Callable[[], object]) -> None:
        """Give `r`'s caller what `compute()` returns, or what it raises, and count it."""
        try:
            out = compute()
        except BaseException as exc:
            with self._cond:
                self._counts["failed"] += 1
            r.future.set_exception(exc)
        else:
            with self._cond:
                self._counts["completed"] += 1
            r.future.set_result(out)


def _safe_call(fn) -> bool:
    try:
        return bool(fn())
    except Exception:
        return False


# ------------------------------------------------------------------------------------------- Ray Serve
APP_NAME = "retina"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ONE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"    # "0": Ray keeps 127.0.0.1 (a one-machine cluster)
CLIENT_CONNECT_TRIES = 3      # Ray Client connections: attempts when the head fails to start its server
REPLICA_ENV = ("RETINA_WEIGHTS_DIR", "RETINA_AUDIT_LOG")   # the app's settings the replicas' code reads too
HEADER_KEYS = ("format", "modality", "modality_name", "sop_class", "ophthalmic", "reason")   # `dicom.header_summary`


COUNTERS = ("submitted", "completed", "failed", "rejected", "timed_out", "stopped", "batch_retried", "jobs")


def _model_name(model) -> str | None:
    return model if model is None or isinstance(model, str) else model.name


class RayServeService:
    """The same API, forwarded to a Ray Serve application whose replicas each hold an `InferenceService`
    (`application`). address: "local" starts Ray in this process and deploys the application there; otherwise the
    address of a running cluster ("auto", "host:port", "ray://host:10001"), where the application already deployed
    under `app_name` is used as it is (found by name) and deployed only when there is none (or `redeploy`).
    Images travel decoded, with only the facts the replicas use (`_for_replica`); models by name."""

    backend = "ray"

    def __init__(self, address: str, config: ServiceConfig | None = None, app_name: str = APP_NAME,
                 redeploy: bool = False):
        import ray

        self.config = config or ServiceConfig.from_env()
        self.address = address
        self.app_name = app_name
        self._owns_ray = not ray.is_initialized()      # this service connected Ray, so `close` disconnects it
        if self._owns_ray:
            if address == "local":
                ray.init(num_cpus=available_cores(), include_dashboard=False, log_to_driver=False)
            else:
                _join_cluster(address)
        handle = None if redeploy else _running_app(app_name)
        self.deployed = handle is None                  # False: found the application already running
        self._handle = handle or deploy(self.config, app_name)

    def analyze(self, image, model=None, method=None, modality=None, target=None, timeout=None,
                cancelled=None) -> Analysis:
        return self._result(self._handle.analyze.remote(_for_replica(image), _model_name(model), method, modality,
                                                        target), timeout, cancelled)

    def call(self, fn, *args, timeout=None, cancelled=None, **kwargs):
        """Other model work (see `InferenceService.call`) runs here, in this process: the replicas serve
        readings by model name and cannot take a function holding a loaded model."""
        return fn(*args, **kwargs)

    def analyze_all(self, image, method=None, modality=None, timeout=None, cancelled=None) -> list[Analysis]:
        return self._result(self._handle.analyze_all.remote(_for_replica(image), method, modality), timeout,
                            cancelled)

    def stats(self) -> dict:
        """The replicas' counters (`InferenceService.stats`) summed over every replica reached, with each replica's
        own under `per_replica` (node and counters), the replicas running, the address, the application's name
        and whether this process deployed it. Serve routes each call to one replica, the least busy of two, so
        the counters are collected by asking several times at once (`replicas_reached` says how many answered).
        The other fields (queue, batch sizes, settings, threads) are the first replica's."""
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        running = sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values()) if app else 0
        seen: dict[str, dict] = {}
        for _ in range(3):
            asks = [self._handle.stats.remote() for _ in range(4 * running if running > 1 else 1)]
            for ask in asks:
                one = ask.result(timeout_s=30)
                seen.setdefault(one.get("replica", "?"), one)
            if len(seen) >= running:
                break
        first = next(iter(seen.values()))
        total = {k: sum(int(r.get(k, 0)) for r in seen.values()) for k in COUNTERS + ("batches",)}
        return {**first, **total, "replicas_running": running, "replicas_reached": len(seen),
                "per_replica": {rid: {"node": r.get("node"), **{k: r.get(k) for k in COUNTERS}}
                                for rid, r in seen.items()},
                "backend": self.backend, "address": self.address, "app": self.app_name,
                "deployed_here": self.deployed}

    def close(self) -> None:
        """Disconnect from Ray where this service connected it. On a cluster the application stays deployed, for the
        app's other processes and its next start; "local" stops the Ray it started, application included."""
        import ray
        from ray import serve

        if self._owns_ray and ray.is_initialized():
            if self.address == "local":
                serve.shutdown()
            ray.shutdown()

    def _result(self, response, timeout, cancelled):
        from ray.serve.exceptions import BackPressureError

        deadline = time.monotonic() + (self.config.timeout_s if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                response.cancel()
                raise ServerBusyError(TIMED_OUT)
            try:
                return response.result(timeout_s=min(left, POLL_S) if cancelled else left)
            except TimeoutError:
                if cancelled is not None and _safe_call(cancelled):
                    response.cancel()
                    raise ServerBusyError(STOPPED) from None
            except BackPressureError:
                raise ServerBusyError(BUSY) from None
            except Exception as exc:
                # Ray raises the replica's exception as a RayTaskError that also derives from its type, with the
                # replica's traceback in its text: an input error comes back as the replica raised it (its message
                # is what pages show), anything else as Ray reports it.
                cause = getattr(exc, "cause", None)
                if isinstance(cause, RetinaInputError):
                    raise cause from None
                raise


def _for_replica(image):
    """The image as it crosses into Ray (its object store, which may spill to disk, and its logs): pixels and the
    facts the replica's gate and reading use (kind, format, content hash, grey, single channel, modality hint,
    laterality, the header's non-identifying summary). Nothing else of `meta` goes, whatever a caller put there; the decoders keep
    patient fields out of a RetinalImage in the first place (io/dicom.py, io/scanners.py)."""
    from .io.decode import SCREEN_SIDE, RetinalImage, read_image

    img = image if isinstance(image, RetinalImage) else read_image(image, max_side=SCREEN_SIDE)
    header = (img.meta or {}).get("header")
    meta = {"header": {k: header[k] for k in HEADER_KEYS if k in header}} if isinstance(header, dict) else {}
    if (img.meta or {}).get("single_channel"):
        meta["single_channel"] = True              # channels are copies of one: the replica preprocesses one
    return RetinalImage(pixels=img.pixels, kind=img.kind, source_format=img.source_format,
                        content_hash=img.content_hash, grayscale=img.grayscale, modality_hint=img.modality_hint,
                        laterality=img.laterality, meta=meta)


def _cluster_endpoint(address: str) -> tuple[str, int, bool] | None:
    """(host, port, Ray Client?) of a cluster address: "host:port", "ray://host:port", or "auto": the address Ray
    itself picks (RAY_ADDRESS, else the cluster `ray start` recorded on this machine; none: Ray's ConnectionError).
    None where this Ray cannot tell."""
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment
        except ImportError:
            return None
        address = get_ray_address_from_environment("auto", None)
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"RETINA_SERVE_ADDRESS={address!r} is not a Ray address; use \"local\", \"auto\", "
                           "\"host:port\" (the head's GCS port, from a machine of the cluster) or "
                           "\"ray://host:10001\" (Ray Client).")
    return host.strip("[]"), int(port), address.startswith("ray://")


def _join_cluster(address: str) -> None:
    """`ray.init` on a running cluster, failing at once when nothing listens at its address (Ray itself retries
    for minutes). A cluster started on 127.0.0.1 listens there only, while Ray maps a loopback address to this
    machine's network address unless its clusters are kept to one machine (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    which `ray start` needs for 127.0.0.1 too; docs/app.md): for a loopback address (not Ray Client's) this process
    gets that setting, unless its environment sets it. Ray reads it when imported, so an already imported Ray is
    told too."""
    import socket

    import ray

    endpoint = _cluster_endpoint(address)
    if endpoint is not None:
        host, port, client = endpoint
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise RuntimeError(f"No Ray cluster answers at {host}:{port} (RETINA_SERVE_ADDRESS={address!r}): {exc}. "
                               "Start one (docs/app.md) or correct the address.") from None
        if host in LOOPBACK and not client:
            os.environ.setdefault(ONE_MACHINE_ENV, "0")
            try:
                from ray._private import ray_constants
                ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ONE_MACHINE_ENV, True)
            except (ImportError, AttributeError):     # another Ray version: its own rules apply
                pass
    for attempt in range(CLIENT_CONNECT_TRIES):
        try:
            ray.init(address=address, log_to_driver=False)
            return
        except ConnectionAbortedError as exc:
            # Ray Client starts a server process per connection on the head; on a busy head that start can fail
            # ("Starting Ray client server failed") and succeed a moment later: seen on a 2-core test machine
            if not address.startswith("ray://") or attempt == CLIENT_CONNECT_TRIES - 1:
                raise
            log.warning("Ray Client could not start its server on the cluster (%s); retrying", type(exc).__name__)
            time.sleep(2.0 * (attempt + 1))


def _running_app(app_name: str):
    """A handle to the application running under `app_name`, or None when the cluster has none (or no Serve)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_app_handle(app_name)
    except RayServeException:
        return None


def deploy(config: ServiceConfig, app_name: str = APP_NAME):
    """Deploy (or redeploy) the application on the Ray this process is connected to, without Serve's HTTP proxy
    (the app calls it through handles); returns its handle once its replicas are ready. Several replicas that
    the cluster's CPUs cannot hold are refused at once (Serve would wait for them for ever)."""
    import ray

    if config.replicas > 1:
        have = float(ray.cluster_resources().get("CPU", 0.0))
        need = config.replicas * config.threads
        if need > have:
            raise RuntimeError(f"RETINA_SERVE_REPLICAS={config.replicas} with {config.threads} CPU(s) each "
                               f"(RETINA_THREADS) needs {need} CPUs; the Ray cluster has {have:g}. Use fewer "
                               "replicas or threads, or add machines to the cluster.")
    from ray import serve

    serve.start(proxy_location="Disabled")
    return serve.run(application(config), name=app_name, route_prefix=None)


def application(config: ServiceConfig):
    """The Ray Serve application (one deployment): each replica holds one `InferenceService` (its own queue, worker and batches);
    Serve's own queue in front of it is bounded by the same queue size (beyond it: BackPressureError, "busy").
    The replicas read the app's weights folder and audit log (`REPLICA_ENV`, where set): the paths must exist on
    the cluster's machines."""
    import asyncio
    import functools

    from ray import serve

    env = {k: os.environ[k] for k in REPLICA_ENV if os.environ.get(k)}
    # one replica takes the cores its machine leaves free (adaptive); several each reserve their threads' CPUs
    cpus = config.threads if config.replicas > 1 else 0
    options = {"num_cpus": cpus, **({"runtime_env": {"env_vars": env}} if env else {})}

    @serve.deployment(name="RetinaInference", num_replicas=config.replicas, max_ongoing_requests=config.queue_size,
                      max_queued_requests=config.queue_size, ray_actor_options=options)
    class RetinaInference:
        def __init__(self, settings: dict):
            import ray

            self.service = InferenceService(ServiceConfig(**settings))
            self.where = {"replica": serve.get_replica_context().replica_id.unique_id,
                          "node": ray.get_runtime_context().get_node_id()[:12]}

        async def _call(self, fn, *args):
            # The replica's event loop stays free while the service batches: each call waits in a thread.
            return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))

        async def analyze(self, image, model, method, modality, target):
            return await self._call(self.service.analyze, image, model, method, modality, target)

        async def analyze_all(self, image, method, modality):
            return await self._call(self.service.analyze_all, image, method, modality)

        def stats(self) -> dict:
            return {**self.service.stats(), **self.where}

    return RetinaInference.bind(asdict(config))


# ------------------------------------------------------------------------------------------- the process's one
_SERVICE: InferenceService | RayServeService | None = None
_SERVICE_LOCK = threading.Lock()


def get_service() -> InferenceService | RayServeService:
    """The process's one service, created on first use from the environment: in-process by default, Ray Serve
    only when RETINA_SERVE_ADDRESS is set."""
    global _SERVICE
    with _SERVICE_LOCK:
        if _SERVICE is None:
            address = os.environ.get("RETINA_SERVE_ADDRESS", "").strip()
            if not address:
                _SERVICE = InferenceService()
            else:
                try:
                    _SERVICE = RayServeService(address)
                except ImportError as exc:
                    raise RuntimeError(f"RETINA_SERVE_ADDRESS is set ({address!r}) but Ray Serve cannot be imported "
                                       f"({exc}); install it with pip install 'ray[serve]', or unset the variable "
                                       "to serve in-process.") from exc
        return _SERVICE


def reset_service() -> None:
    """Close the process's service (tests; a changed environment takes effect at the next `get_service`)."""
    global _SERVICE
    with _SERVICE_LOCK:
        svc, _SERVICE = _SERVICE, None
    if svc is not None:
        svc.close()
