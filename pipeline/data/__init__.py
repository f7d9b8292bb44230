"""Cohorts: manifests, readers' MONAI transform chains, ingest cache, and the demo cohort."""
