"""Where the clinic's records live and how they are protected, read from the environment (the app and the CLI alike).

    RETINA_MODE          dev (default) | production | demo
    RETINA_DATA_DIR      folder for the SQLite file, the content store and the dev site secret (default ./var)
    RETINA_DATABASE_URL  SQLAlchemy URL (default sqlite:///$RETINA_DATA_DIR/retina.db); postgresql://... uses psycopg 3
    RETINA_SITE_SECRET   the key of the DICOM PatientID hash (>= 32 characters); required in production

dev: records in SQLite (or RETINA_DATABASE_URL), a generated per-install site secret file where none is set.
production: as dev, but hashing a PatientID without RETINA_SITE_SECRET is refused.
demo: nothing is persisted; the worklist pages say so and the upload page offers no "Save to worklist".
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import RetinaInputError

MODES = ("dev", "production", "demo")


class ClinicConfigError(RetinaInputError):
    """The clinic's set-up (environment, database, secret) is wrong: a message an operator can act on."""


@dataclass(frozen=True)
class ClinicConfig:
    mode: str                 # "dev" | "production" | "demo"
    data_dir: Path            # SQLite file, content store, dev secret
    database_url: str         # SQLAlchemy URL (postgresql:// normalised to postgresql+psycopg://)

    @property
    def persistent(self) -> bool:
        return self.mode != "demo"

    @property
    def store_dir(self) -> Path:
        """The content-addressed store of images and heatmaps (file names are sha256 digests)."""
        return self.data_dir / "store"


def normalise_url(url: str) -> str:
    """postgres:// and postgresql:// (no driver named) -> postgresql+psycopg:// (psycopg 3, the driver installed)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def load_config(environ: dict | None = None) -> ClinicConfig:
    """The clinic configuration from `environ` (default os.environ)."""
    env = os.environ if environ is None else environ
    mode = (env.get("RETINA_MODE") or "dev").strip().lower()
    if mode not in MODES:
        raise ClinicConfigError(f"RETINA_MODE={mode!r} is not one of {', '.join(MODES)}.")
    data_dir = Path(env.get("RETINA_DATA_DIR") or "var").expanduser().resolve()
    url = (env.get("RETINA_DATABASE_URL") or "").strip() or f"sqlite:///{data_dir / 'retina.db'}"
    return ClinicConfig(mode=mode, data_dir=data_dir, database_url=normalise_url(url))


def safe_url(url: str) -> str:
    """The URL with any password masked, for screens and logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
