"""Privacy by design: pseudonymous case references, and DICOM PatientIDs kept only as a keyed hash.

    ref = validate_case_ref(" scr-0042 ")          # 'scr-0042' (stripped, checked; never a name or date)
    key = dicom_patient_key(dicom_bytes, site_secret(config))   # HMAC-SHA256 hex of PatientID, or None

A case reference is typed by the clinician and must NOT identify the patient (no name, birth date, record or phone
number). `validate_case_ref` catches the obvious mistakes only (spaces, long runs of letters or digits, dates); it
cannot recognise every identifier, so the rule is also stated next to the field.

The PatientID of an uploaded DICOM is read on its own (`dicom_patient_key`: no other element is kept), hashed at once
with HMAC-SHA256 under the site secret, and only the hex digest is stored: studies of one patient group together,
the ID itself is never written anywhere, and without the secret the digest cannot be checked against a guessed ID.
The secret comes from RETINA_SITE_SECRET. In production mode hashing without it is refused; in dev mode a
per-install secret is generated once into `$RETINA_DATA_DIR/site_secret.DEV-ONLY` (mode 0600, marked as such):
keys made with it do not match another installation's, and a lost file means new studies stop grouping with old ones.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import secrets
import warnings

from .config import ClinicConfig, ClinicConfigError

MIN_REF, MAX_REF = 3, 32
MIN_SECRET = 32                     # characters of RETINA_SITE_SECRET
SECRET_FILE = "site_secret.DEV-ONLY"
_KEY_DOMAIN = b"retina-core/dicom-patient-id/v1\x00"   # domain separation: this secret keys nothing else the same way

_ALLOWED = re.compile(r"^[A-Za-z0-9._-]+$")
_DATE = re.compile(r"(?<!\d)(\d{4}[./-]\d{1,2}[./-]\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4})(?!\d)")
_LONG_DIGITS = re.compile(r"\d{8,}")
_LONG_LETTERS = re.compile(r"[A-Za-z]{7,}")


def validate_case_ref(text: str | None) -> str:
    """The clinician's pseudonymous case reference, stripped and checked; else `RetinaInputError` saying what to
    change. Rules: 3-32 characters, letters, digits, '-', '_', '.'
    only (no spaces, so no "First Last"), at least one digit, no date, no run of 8+ digits (birth dates, phone,
    record numbers), no run of 7+ letters (names)."""
    from ..errors import RetinaInputError

    ref = (text or "").strip()
    why = None
    if not ref:
        why = "Type a case reference."
    elif not MIN_REF <= len(ref) <= MAX_REF:
        why = f"A case reference has {MIN_REF} to {MAX_REF} characters."
    elif not _ALLOWED.match(ref):
        why = "Use letters, digits, '-', '_' or '.' only (no spaces)."
    elif not any(c.isdigit() for c in ref):
        why = "A case reference needs at least one digit (e.g. SCR-0042)."
    elif _DATE.search(ref):
        why = "It looks like it holds a date."
    elif _LONG_DIGITS.search(ref):
        why = "It holds 8 or more digits in a row, like a birth date, phone or record number."
    elif _LONG_LETTERS.search(ref):
        why = "It holds 7 or more letters in a row, like a name."
    if why:
        raise RetinaInputError(f"{why} The case reference must be a pseudonym, never a name, birth date or "
                               "hospital number: use your own key list (e.g. SCR-0042) or generate one.")
    return ref


def new_case_ref() -> str:
    """A random reference such as 'C-7KQ2-M9XD' (unambiguous letters and digits; always passes validation)."""
    alphabet = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
    while True:
        body = "".join(secrets.choice(alphabet) for _ in range(8))
        ref = f"C-{body[:4]}-{body[4:]}"
        if any(c.isdigit() for c in body):
            return validate_case_ref(ref)


def site_secret(config: ClinicConfig, environ: dict | None = None) -> bytes:
    """The key of the PatientID hash: RETINA_SITE_SECRET; else, outside production, the per-install dev secret
    file (created on first use). Production without RETINA_SITE_SECRET raises `ClinicConfigError`."""
    env = os.environ if environ is None else environ
    value = (env.get("RETINA_SITE_SECRET") or "").strip()
    if value:
        if len(value) < MIN_SECRET:
            raise ClinicConfigError(f"RETINA_SITE_SECRET is too short ({len(value)} characters; at least "
                                    f"{MIN_SECRET}: e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`).")
        return value.encode("utf-8")
    if config.mode == "production":
        raise ClinicConfigError("RETINA_SITE_SECRET is not set: in production mode a DICOM PatientID is never "
                                "hashed with a generated key. Set RETINA_SITE_SECRET (kept outside the database).")
    return _dev_secret(config)


def _dev_secret(config: ClinicConfig) -> bytes:
    path = config.data_dir / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = ("# GENERATED DEV/DEMO SITE SECRET - NOT FOR PRODUCTION.\n"
                "# Keys DICOM PatientID hashes of this installation only. In production set RETINA_SITE_SECRET\n"
                "# (RETINA_MODE=production refuses this file). Losing it stops new studies grouping with old ones.\n"
                f"{secrets.token_hex(32)}\n")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass                    # another process made it first: read theirs
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines or len(lines[0]) < MIN_SECRET:
        raise ClinicConfigError(f"The dev site secret file {path} is damaged; delete it to make a new one "
                                "(new studies will then not group with earlier ones).")
    return lines[0].encode("utf-8")


def patient_key(patient_id: str, secret: bytes) -> str:
    """HMAC-SHA256 hex digest of a patient ID (surrounding spaces, DICOM padding, ignored)."""
    norm = str(patient_id).strip().strip("\x00").strip()
    if not norm:
        raise ValueError("empty patient ID")
    return hmac.new(secret, _KEY_DOMAIN + norm.encode("utf-8"), hashlib.sha256).hexdigest()


def dicom_patient_key(data: bytes, secret: bytes) -> str | None:
    """The keyed hash of a DICOM file's PatientID, or None (not DICOM, unreadable, no or empty PatientID).

    Reads the PatientID element only (`specific_tags`), hashes it and drops it: the value never leaves this
    function, is never logged (pydicom's warnings are silenced and its log records stripped, as in io/dicom.py)."""
    from ..io.decode import sniff_format

    from ..errors import RetinaInputError

    try:
        if sniff_format(bytes(data[:1024])) != "dicom":
            return None
    except RetinaInputError:
        return None
    import pydicom

    from ..io import dicom as _dicom_logs  # noqa: F401 - installs the filter that drops pydicom record text

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["PatientID"],
                                 force=data[128:132] != b"DICM")
            value = ds.get("PatientID", None)
        except Exception:   # noqa: BLE001 - an unreadable header has no key; never chain (messages quote values)
            return None
    try:
        return patient_key(str(value), secret) if value is not None else None
    except ValueError:
        return None
    finally:
        del value
