"""Fixtures of the report tests (defined in :mod:`synthetic_run`)."""

from synthetic_run import explained_run, reported_run, run_folder  # noqa: F401 (pytest fixtures)
