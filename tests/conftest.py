"""Shared fixtures: tiny phantom images written to disk, and a fast torch set-up for 2-core machines."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def demo_mode_by_default():
    """Page tests run in demo mode (RETINA_MODE=demo: no sign-in, nothing stored) unless they set a mode: the
    clinic's tests pick dev with a temporary RETINA_DATA_DIR and sign in, so no test writes ./var."""
    import os

    if "RETINA_MODE" in os.environ:
        yield
        return
    os.environ["RETINA_MODE"] = "demo"
    try:
        yield
    finally:
        os.environ.pop("RETINA_MODE", None)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def fundus_png(tmp_path_factory):
    from retina_core.phantoms import fundus_phantom

    path = tmp_path_factory.mktemp("fundus") / "fundus_moderate.png"
    path.write_bytes(png_bytes(fundus_phantom("Moderate", seed=101, size=384).image))
    return path


@pytest.fixture(scope="session")
def oct_png(tmp_path_factory):
    from retina_core.phantoms import oct_phantom

    path = tmp_path_factory.mktemp("oct") / "oct_cnv.png"
    path.write_bytes(png_bytes(oct_phantom("CNV", seed=202).image))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a busy
    2-core machine two threads made each small 3-D forward ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_volume_net():
    """A random-init volume model whose 3-D Grad-CAM has 2 x 4 x 4 cells (stride-1 stem, layer3) at 16 x 32 x 32."""
    from retina_core.models import create_model, get_cfg

    torch.manual_seed(0)
    name = "oct_volume_fusion3d_tiny"
    kw = {**get_cfg(name).builder_kwargs, "conv1_stride": 1}
    return create_model(name, input_size=(1, 16, 32, 32), target_layer="net.layer3", builder_kwargs=kw).eval()


@pytest.fixture(scope="session")
def realdata():
    """The real public sets (../shared/realdata, or $RETINA_REALDATA). Absent: the test skips with the reason, unless
    RETINA_REQUIRE_REALDATA=1 (set by .ci/run), where their absence is a failure."""
    import os

    from retina_core.io.realsets import realdata_root

    root = realdata_root()
    if root is None:
        msg = "real data absent: ../shared/realdata (or $RETINA_REALDATA) not found"
        if os.environ.get("RETINA_REQUIRE_REALDATA") == "1":
            pytest.fail(msg + "; CI requires it (RETINA_REQUIRE_REALDATA=1)")
        pytest.skip(msg)
    return root


# ------------------------------------------------------------------------------ clinic database: SQLite + PostgreSQL
def _pg_tool(name: str):
    """`name` (initdb, pg_ctl) on PATH, else the newest of Debian's /usr/lib/postgresql/<version>/bin."""
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: [int(x) for x in p.split("/")[4].split(".") if x.isdigit()])
    return versions[-1] if versions else None


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL cluster on 127.0.0.1 and a free port (initdb in a temporary folder, trust auth, no
    fsync), stopped and deleted at the end of the session; yields `new_database()` -> a SQLAlchemy URL of a fresh,
    empty database. PostgreSQL refuses to run as root, so as root the server runs as the `postgres` (else `nobody`)
    user through runuser. Absent or failing: the tests skip with the reason, unless RETINA_REQUIRE_POSTGRES=1
    (set by .ci/run), where that is a failure."""
    import itertools
    import os
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    def unavailable(msg: str):
        if os.environ.get("RETINA_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL unavailable: {msg}; CI requires it (RETINA_REQUIRE_POSTGRES=1)")
        pytest.skip(f"PostgreSQL unavailable: {msg}")

    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not initdb or not pg_ctl:
        unavailable("no initdb / pg_ctl found (Debian: apt-get install postgresql)")
    root = tempfile.mkdtemp(prefix="retina-pg-")
    prefix = []
    if os.geteuid() == 0:
        users = [u for u in ("postgres", "nobody") if _user_exists(pwd, u)]
        if not users or not shutil.which("runuser"):
            shutil.rmtree(root, ignore_errors=True)
            unavailable("running as root without a `postgres` or `nobody` user and runuser")
        pw = pwd.getpwnam(users[0])
        os.chown(root, pw.pw_uid, pw.pw_gid)
        prefix = [shutil.which("runuser"), "-u", users[0], "--"]
    data, log = os.path.join(root, "data"), os.path.join(root, "server.log")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd):
        return subprocess.run(prefix + list(cmd), capture_output=True, text=True, timeout=120, cwd=root)

    r = run(initdb, "-D", data, "-A", "trust", "-U", "retina", "-E", "UTF8", "--no-sync")
    if r.returncode:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"initdb failed: {(r.stderr or r.stdout).strip()[-400:]}")
    opts = (f"-k {root} -h 127.0.0.1 -p {port} -F -c full_page_writes=off -c synchronous_commit=off "
            "-c max_connections=40 -c shared_buffers=16MB")
    r = run(pg_ctl, "-D", data, "-o", opts, "-l", log, "-w", "-t", "60", "start")
    if r.returncode:
        text = open(log).read()[-400:] if os.path.exists(log) else r.stderr
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"pg_ctl start failed: {text.strip()}")
    counter = itertools.count()

    def new_database() -> str:
        import psycopg

        name = f"retina_test_{next(counter)}"
        with psycopg.connect(host="127.0.0.1", port=port, user="retina", dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://retina@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        run(pg_ctl, "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(pwd, name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def clinic_db_url(request, tmp_path):
    """The URL of an empty clinic database: a SQLite file, then a fresh PostgreSQL database (`postgres_server`)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'clinic.db'}"
    return request.getfixturevalue("postgres_server")()


@pytest.fixture
def clinic(clinic_db_url, tmp_path):
    """An open clinic (schema at head) on `clinic_db_url`, its content store and dev secret under tmp_path."""
    from retina_core.clinic import ClinicConfig, open_clinic

    c = open_clinic(ClinicConfig(mode="dev", data_dir=tmp_path / "data", database_url=clinic_db_url))
    yield c
    c.dispose()
