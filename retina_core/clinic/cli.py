"""`python -m retina_core clinic ...`: the clinic database from the command line.

    python -m retina_core clinic status [--json]              # mode, database, schema revision, counts
    python -m retina_core clinic upgrade                      # migrate to the newest schema (the app does it too)
    python -m retina_core clinic export --out DIR [--model M] # signed reviews as a labels.csv set `train` reads
"""
from __future__ import annotations

import json


def add_cli(sub) -> None:
    clinic = sub.add_parser("clinic", help="the worklist database: status, schema upgrade, export of reviewed "
                                           "cases as a labelled data set").add_subparsers(dest="clinic_command",
                                                                                         required=True)
    p = clinic.add_parser("status", help="mode, database, schema revision and counts (RETINA_DATABASE_URL, "
                                         "RETINA_DATA_DIR, RETINA_MODE)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = clinic.add_parser("upgrade", help="migrate the database to the newest schema revision")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_upgrade)
    p = clinic.add_parser("export", help="signed reviews as labels.csv + images (the layout `train --data` reads)")
    p.add_argument("--out", required=True, help="folder to write (one sub-folder per model unless --model)")
    p.add_argument("--model", default=None, help="only this model's readings, written straight into --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)


def _print(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        for k, v in obj.items():
            print(f"{k}: {v}")


def cmd_status(args) -> int:
    from sqlalchemy import func, select

    from . import db
    from .config import load_config, safe_url
    from .schema import AnalysisRecord, Case, Review

    cfg = load_config()
    out = {"mode": cfg.mode, "database": safe_url(cfg.database_url), "store": str(cfg.store_dir)}
    if cfg.persistent:
        out["revision"] = db.current_revision(cfg.database_url)
        out["head"] = db.HEAD
        if out["revision"] == db.HEAD:
            clinic = db.open_clinic(cfg, migrate=False)
            try:
                with clinic.session() as s:
                    out["cases"] = s.scalar(select(func.count(Case.id)))
                    out["analyses"] = s.scalar(select(func.count(AnalysisRecord.id)))
                    out["signed_reviews"] = s.scalar(select(func.count(Review.id)).where(Review.signed_at.is_not(None)))
            finally:
                clinic.dispose()
    _print(out, args.json)
    return 0


def cmd_upgrade(args) -> int:
    from . import db
    from .config import ClinicConfigError, load_config, safe_url

    cfg = load_config()
    if not cfg.persistent:
        raise ClinicConfigError("Demo mode (RETINA_MODE=demo) has no database to upgrade.")
    before = db.current_revision(cfg.database_url)
    db.upgrade(cfg.database_url)
    _print({"database": safe_url(cfg.database_url), "from": before, "to": db.current_revision(cfg.database_url)},
           args.json)
    return 0


def cmd_export(args) -> int:
    from .db import open_clinic
    from .export import export_labels

    clinic = open_clinic()
    try:
        summary = export_labels(clinic, args.out, model=args.model, actor="cli export")
    finally:
        clinic.dispose()
    if args.json:
        print(json.dumps({"folders": summary.folders, "counts": summary.counts, "images": summary.total}))
    else:
        for m, folder in summary.folders.items():
            labels = ", ".join(f"{k} {v}" for k, v in summary.counts[m].items()) or "no signed labels"
            print(f"{m}: {sum(summary.counts[m].values())} image(s) -> {folder}/labels.csv  ({labels})")
            print(f"  train: python -m retina_core train --model {m} --data {folder} --out runs/{m}_clinic")
        if not summary.folders:
            print("no signed reviews to export")
    return 0
