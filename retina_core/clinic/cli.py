"""`python -m retina_core clinic ...`: the clinic database from the command line.

    python -m retina_core clinic status [--json]              # mode, database, schema revision, counts
    python -m retina_core clinic upgrade                      # migrate to the newest schema (the app does it too)
    python -m retina_core clinic export --out DIR [--model M] # signed reviews as a labels.csv set `train` reads
    python -m retina_core clinic results --analysis N --out DIR [--format fhir sr heatmap]
                                                              # FHIR R4 DiagnosticReport, DICOM SR, heatmap object
    python -m retina_core clinic user add NAME --role clinician [--role admin] [--name "Dr K"] [--password-stdin]
    python -m retina_core clinic user list | roles NAME --role R ... | disable NAME | enable NAME | unlock NAME
    python -m retina_core clinic user set-password NAME [--password-stdin]

Passwords are read from a prompt (not echoed), or from standard input with --password-stdin (scripts); never from
an argument, which would land in the shell history and the process list.
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
    p = clinic.add_parser("results", help="one stored analysis as a FHIR R4 DiagnosticReport (JSON), a DICOM "
                                          "Structured Report and its heatmap as a DICOM object")
    p.add_argument("--analysis", type=int, required=True, help="the analysis id (see the case page)")
    p.add_argument("--out", required=True, help="folder to write analysis-N.* into")
    p.add_argument("--format", nargs="+", choices=("fhir", "sr", "heatmap"), default=None,
                   help="default: all that apply (no heatmap object for an analysis without a heatmap)")
    p.set_defaults(func=cmd_results)

    users = clinic.add_parser("user", help="accounts: add, list, roles, disable, enable, unlock, set-password"
                              ).add_subparsers(dest="user_command", required=True)
    p = users.add_parser("add", help="a new account (the first admin of a production install is made here)")
    p.add_argument("username")
    p.add_argument("--role", action="append", required=True, choices=("clinician", "researcher", "admin"))
    p.add_argument("--name", default="", help="the name shown on reviews")
    p.add_argument("--sso", action="store_true", help="signs in through single sign-on only (no password)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=cmd_user_add)
    p = users.add_parser("list", help="accounts, roles, state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_user_list)
    p = users.add_parser("roles", help="replace an account's roles")
    p.add_argument("username")
    p.add_argument("--role", action="append", required=True, choices=("clinician", "researcher", "admin"))
    p.set_defaults(func=cmd_user_change, change="roles")
    for name, text in (("disable", "disable an account (its sessions end; it is never deleted)"),
                       ("enable", "re-enable a disabled account"),
                       ("unlock", "lift the lock-out after repeated failed sign-ins")):
        p = users.add_parser(name, help=text)
        p.add_argument("username")
        p.set_defaults(func=cmd_user_change, change=name)
    p = users.add_parser("set-password", help="set a new password (its sessions end, the account is unlocked)")
    p.add_argument("username")
    p.add_argument("--password-stdin", action="store_true")
    p.set_defaults(func=cmd_user_change, change="set-password")


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


def cmd_results(args) -> int:
    from .db import open_clinic
    from .interop import export_results

    clinic = open_clinic()
    try:
        written = export_results(clinic, args.analysis, args.out, actor="command line",
                                 formats=tuple(args.format) if args.format else None)
    finally:
        clinic.dispose()
    for path in written:
        print(path)
    return 0


def _read_password(from_stdin: bool) -> str:
    import getpass
    import sys

    from ..errors import RetinaInputError

    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise RetinaInputError("No terminal to ask for the password: pipe it in with --password-stdin.")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise RetinaInputError("The two passwords differ.")
    return first


def _open():
    from .db import open_clinic

    return open_clinic()


def cmd_user_add(args) -> int:
    from . import accounts

    password = None if args.sso else _read_password(args.password_stdin)
    clinic = _open()
    try:
        u = accounts.create_user(clinic, args.username, password, roles=args.role, display_name=args.name)
    finally:
        clinic.dispose()
    print(f"account {u.username} created: {', '.join(u.roles)}" + (" (single sign-on)" if args.sso else ""))
    return 0


def cmd_user_list(args) -> int:
    from . import accounts

    clinic = _open()
    try:
        users = accounts.list_users(clinic)
    finally:
        clinic.dispose()
    rows = [{"username": u.username, "name": u.display_name, "roles": list(u.roles), "active": u.active,
             "sso": u.sso, "locked_until": u.locked_until, "last_login_at": u.last_login_at} for u in users]
    if args.json:
        print(json.dumps(rows, default=str))
    else:
        for r in rows:
            state = ("active" if r["active"] else "disabled") + (f", locked until {r['locked_until']:%Y-%m-%d %H:%M}"
                                                                 if r["locked_until"] else "")
            print(f"{r['username']}\t{','.join(r['roles'])}\t{state}\t{r['name']}")
        if not rows:
            print("no accounts yet: python -m retina_core clinic user add NAME --role admin --role clinician")
    return 0


def cmd_user_change(args) -> int:
    from . import accounts

    password = _read_password(args.password_stdin) if args.change == "set-password" else None
    clinic = _open()
    try:
        if args.change == "roles":
            u = accounts.set_roles(clinic, args.username, args.role)
        elif args.change in ("disable", "enable"):
            u = accounts.set_active(clinic, args.username, args.change == "enable")
        elif args.change == "unlock":
            u = accounts.unlock(clinic, args.username)
        else:
            u = accounts.reset_password(clinic, args.username, password)
    finally:
        clinic.dispose()
    print(f"{u.username}: {args.change} done ({', '.join(u.roles)}, {'active' if u.active else 'disabled'})")
    return 0
