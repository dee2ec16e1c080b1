"""The clinic: a persistent worklist of pseudonymous cases, stored readings with their heatmaps, versioned clinician
reviews and an audit trail (SQLAlchemy 2 + Alembic; SQLite by default, PostgreSQL by RETINA_DATABASE_URL).

    from retina_core.clinic import open_clinic, records
    clinic = open_clinic()                         # schema upgraded to the newest revision on opening
    saved = records.save_reading(clinic, case_ref="SCR-0042", eye="OD", visit_date=date.today(),
                                 image=img, analyses=rc.analyze_all(img), actor="dr-k")
    records.save_review(clinic, saved.analysis_ids[0], "agree", reviewer="dr-k", sign=True)

See docs/clinic.md for the schema, the privacy design and the environment variables.
"""
from .config import ClinicConfig, ClinicConfigError, load_config
from .db import Clinic, downgrade, open_clinic, upgrade

__all__ = ["Clinic", "ClinicConfig", "ClinicConfigError", "downgrade", "load_config", "open_clinic", "upgrade"]
