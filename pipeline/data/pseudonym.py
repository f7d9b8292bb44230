"""Stable pseudonyms for patients and studies, so that no identifier from the input leaves it.

A keyed hash (HMAC-SHA256) maps an identifier to a short token. The same identifier and key give
the same token on every run and machine (needed to join and to resume), while the token reveals
nothing without the key. Set ``SIMPLEBITS_PSEUDONYM_KEY`` to a site secret for real data; the
built-in key is only adequate for public or synthetic cohorts.
"""

from __future__ import annotations

import hashlib
import hmac
import os

_DEFAULT_KEY = "simplebits-cxr/public-default-key"


def _key() -> bytes:
    return os.environ.get("SIMPLEBITS_PSEUDONYM_KEY", _DEFAULT_KEY).encode("utf-8")


def pseudonym(identifier: object, kind: str, length: int = 12) -> str:
    """``pseudonym("10000032", "patient")`` -> ``"pat-3f9c0a1b2d4e"``. ``kind`` namespaces the hash."""
    if identifier is None or str(identifier).strip() == "":
        raise ValueError(f"cannot pseudonymise an empty {kind} identifier")
    digest = hmac.new(_key(), f"{kind}:{identifier}".encode("utf-8"), hashlib.sha256).hexdigest()
    prefix = {"patient": "pat", "study": "std", "image": "img"}.get(kind, kind[:3])
    return f"{prefix}-{digest[:length]}"


def patient_pseudonym(patient_id: object) -> str:
    return pseudonym(patient_id, "patient")


def study_pseudonym(study_id: object) -> str:
    return pseudonym(study_id, "study")
