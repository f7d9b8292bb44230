"""Fixtures of the report tests (defined in :mod:`synthetic_run`)."""

from synthetic_run import reported_run, run_folder  # noqa: F401 (pytest fixtures)
