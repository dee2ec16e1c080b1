"""Driving the real app in headless Chromium: start `streamlit run` on 127.0.0.1, wait for pages, pick options.

Used by tests/test_browser.py and by the app benchmarks (`bench --only cold_start,concurrent_sessions`). Needs
Debian's chromium (`apt-get install -y chromium`) and Playwright's Python package (requirements-dev.txt); Playwright
is pointed at /usr/bin/chromium and never downloads a browser.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def chromium_available() -> bool:
    return Path(CHROMIUM).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_server(weights_dir: str | os.PathLike | None = None, timeout_s: float = 120,
               env_extra: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`streamlit run app.py` on 127.0.0.1 and a free port; yields (url, process) once /_stcore/health answers;
    stopped on exit. weights_dir: RETINA_WEIGHTS_DIR for the server (default: the bundled weights).
    env_extra: more environment for the server, e.g. RETINA_MODE=demo (no sign-in) or RETINA_DATA_DIR."""
    env = dict(os.environ) | dict(env_extra or {})
    if weights_dir:
        env["RETINA_WEIGHTS_DIR"] = str(weights_dir)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                             "--server.address", "127.0.0.1", "--server.port", str(port),
                             "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout_s)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"streamlit did not start within {timeout_s:.0f} s")


def wait_idle(page, timeout_s: float = 240) -> None:
    """Until Streamlit's 'running' indicator has been gone for two seconds."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=60000)
    end, quiet = time.time() + timeout_s, 0
    while time.time() < end and quiet < 4:
        quiet = quiet + 1 if page.locator('[data-testid="stStatusWidget"]').count() == 0 else 0
        time.sleep(0.5)


def choose(page, label: str, option: str, idle: bool = True) -> None:
    """Pick `option` in the selectbox whose label contains `label`."""
    box = page.locator('[data-testid="stSelectbox"]').filter(has_text=label).first
    combo = box.get_by_role("combobox")
    combo.click()
    combo.fill(option)                      # filters the (virtualised) option list down to the one wanted
    page.get_by_role("option", name=option).first.click()
    if idle:
        time.sleep(0.5)
        wait_idle(page)


def launch(playwright):
    """Debian's chromium with the flags this project's machines need."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)


def _proc_stat(pid: int) -> tuple[int, str, float] | None:
    """(parent pid, command name, user + system CPU seconds) of a live process, from /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()          # fields from the state (the 3rd) on
    return int(fields[1]), name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_group(groups: dict[str, int]) -> dict[str, dict[int, float]]:
    """CPU seconds used so far by each process tree: {group: {pid: seconds}} for every live process under each
    root pid of `groups` ({"server": streamlit's pid, ...}). A process under two roots counts for the deeper one
    (the server is not also counted under this process). Linux /proc only."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
    out: dict[str, dict[int, float]] = {g: {} for g in groups}
    roots = {pid: g for g, pid in groups.items()}
    for pid, (_, _, cpu) in stats.items():
        p, seen = pid, 0
        while p and p not in roots and seen < 64:          # walk up to the nearest root
            p, seen = (stats[p][0] if p in stats else 0), seen + 1
        if p in roots:
            out[roots[p]][pid] = cpu
    return out


def cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds each group used between two `cpu_by_group` snapshots (processes started in between count
    in full; processes that ended in between are lost: their time is not in /proc any more)."""
    return {g: round(sum(cpu - before.get(g, {}).get(pid, 0.0) for pid, cpu in procs.items()), 2)
            for g, procs in after.items()}


class CpuSampler:
    """`cpu_by_group` snapshots every `interval_s` in a background thread, so the CPU used between two moments
    known only afterwards (the first request, the last result on screen) can be read off: `used(t0, t1)` takes
    the last snapshot at or before t0 and the first at or after t1 (the window is at most one interval wider)."""

    def __init__(self, groups: dict[str, int], interval_s: float = 0.25):
        import threading

        self.groups, self.interval_s = groups, interval_s
        self.snaps: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.snaps.append((time.time(), cpu_by_group(self.groups)))
            if self._stop.wait(self.interval_s):
                self.snaps.append((time.time(), cpu_by_group(self.groups)))
                return

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def used(self, t0: float, t1: float) -> tuple[float, dict[str, float]]:
        """(the window's length in seconds, CPU seconds per group in it)."""
        before = [s for s in self.snaps if s[0] <= t0] or self.snaps[:1]
        after = [s for s in self.snaps if s[0] >= t1] or self.snaps[-1:]
        (ta, a), (tb, b) = before[-1], after[0]
        return round(tb - ta, 2), cpu_used(a, b)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
