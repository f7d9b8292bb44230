"""What the browser tests share: Debian's chromium driven by Playwright (its own browser download is
offline-blocked), and where their screenshots go for a human to look at."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT_DIR = Path(os.environ.get("SIMPLEBITS_SCREENSHOT_DIR", "/tmp"))

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (make browser)")
