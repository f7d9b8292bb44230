"""Synthetic but realistic-looking patient identities (PHI on purpose, deterministic per seed).

They exist so that downstream tests can prove that no identifier from a DICOM header ever reaches
a manifest, report or figure. All names are invented combinations from short lists.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

FIRST_NAMES = {
    "F": ("Anna", "Maria", "Laura", "Sofia", "Emma", "Julia", "Hannah", "Clara", "Elena", "Grace",
          "Olivia", "Amelia", "Ingrid", "Noor", "Yuki", "Priya", "Fatima", "Chloe", "Ruth", "Agnes"),
    "M": ("James", "Peter", "Lukas", "David", "Mohammed", "Jonas", "Felix", "Daniel", "Hiroshi", "Omar",
          "Samuel", "Henrik", "Arjun", "Pablo", "Thomas", "Victor", "Erik", "Leon", "George", "Ivan"),
}
LAST_NAMES = ("Smith", "Muller", "Garcia", "Rossi", "Nowak", "Jensen", "Tanaka", "Okafor", "Dubois", "Silva",
              "Kowalski", "Novak", "Andersen", "Fischer", "Moreau", "Santos", "Ivanova", "Haddad", "Kim",
              "Larsen", "Weber", "Costa", "Yilmaz", "Murphy", "Bauer", "Schmidt", "Nguyen", "Patel")
INSTITUTIONS = (
    "St. Elsewhere General Hospital", "Riverside Medical Center", "Northfield University Hospital",
    "Lakeview Community Clinic", "Mercy West Radiology",
)
REFERRERS = ("Dr^House", "Dr^Quinn", "Dr^Carter", "Dr^Grey", "Dr^Ross")


@dataclass(frozen=True)
class PatientIdentity:
    name: str  # DICOM PN, "Last^First"
    mrn: str
    birth_date: dt.date
    institution: str


def patient_identity(rng: np.random.Generator, index: int, seed: int, sex: str, age_at_first_study: float,
                     first_study: dt.date) -> PatientIdentity:
    """A patient's name, a medical record number unique within the cohort, birth date and hospital."""
    first = FIRST_NAMES[sex][int(rng.integers(len(FIRST_NAMES[sex])))]
    last = LAST_NAMES[int(rng.integers(len(LAST_NAMES)))]
    # 104729 is prime and coprime to 9e6, so distinct indices give distinct 7-digit numbers.
    mrn = f"{1_000_000 + (seed * 7919 + index * 104729) % 9_000_000}"
    birth = first_study - dt.timedelta(days=int(round(age_at_first_study * 365.25)))
    return PatientIdentity(f"{last}^{first}", mrn, birth, INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))])


def accession_number(seed: int, study_index: int) -> str:
    """Unique per study within a cohort (130003 is prime and coprime to 9e7)."""
    return f"ACC{10_000_000 + (seed * 3571 + study_index * 130003) % 90_000_000}"
