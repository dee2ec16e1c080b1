"""The kinds of input a model reads, as one enum every layer imports (io, models, explain, audit, the app).

    >>> Modality.OCT_VOLUME == "oct_volume"        # a str: stored values, JSON, CSV and manifests keep the strings
    True
    >>> f"{Modality.FUNDUS_OCT}", json.dumps(Modality.OCT)
    ('fundus+oct', '"oct"')

Values handed to a database driver are converted with `str(m)` (psycopg may dump an Enum by name), and messages
quote `str(m)`, since `repr(m)` is the enum's ("<Modality.OCT: 'oct'>").
"""
from __future__ import annotations

from enum import StrEnum


class Modality(StrEnum):
    """What a model reads: a colour fundus photograph, an OCT B-scan, an OCT volume (with the clinical record), or
    a fundus photograph and an OCT B-scan of the same eye."""

    FUNDUS = "fundus"
    OCT = "oct"
    OCT_VOLUME = "oct_volume"
    FUNDUS_OCT = "fundus+oct"


IMAGE_MODALITIES = (Modality.FUNDUS, Modality.OCT)    # one 2-D image per sample (the quality gate detects these)
