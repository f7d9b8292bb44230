import pytest

from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym


def test_stable_and_namespaced():
    assert patient_pseudonym("10000032") == patient_pseudonym("10000032")
    assert patient_pseudonym("10000032").startswith("pat-")
    assert study_pseudonym("10000032").startswith("std-")
    assert patient_pseudonym("10000032")[4:] != study_pseudonym("10000032")[4:]
    assert "10000032" not in patient_pseudonym("10000032")


def test_key_changes_tokens(monkeypatch):
    default = patient_pseudonym("A")
    monkeypatch.setenv("SIMPLEBITS_PSEUDONYM_KEY", "site-secret")
    assert patient_pseudonym("A") != default


def test_empty_identifier_rejected():
    with pytest.raises(ValueError):
        patient_pseudonym("  ")
