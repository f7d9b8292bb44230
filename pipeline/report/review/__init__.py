"""Radiologist review: local server, single-page app (``static/``), SQLite ratings store."""
