"""The review page in a real browser (Debian chromium via Playwright): rate, restart, ratings still there."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_helpers import CHROMIUM, CHROMIUM_ARGS, SCREENSHOT_DIR, needs_chromium
from synthetic_run import running_review_server

pytestmark = [
    pytest.mark.browser,
    needs_chromium,
]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def open_page(browser, base: str):
    """The page under its real Content-Security-Policy, so waits use locators (no JS eval allowed)."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 820})
    page.goto(base + "/")
    expect(page.locator("#position")).to_contain_text(" / ")
    return page


def viewer_brightness(page, selector: str) -> float:
    """Mean grey value of a canvas as rendered on screen (a screenshot, not an in-page read)."""
    import io

    import numpy as np
    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("L")).mean())


def set_reader(page, name: str) -> None:
    """Type the reader's name and leave the field (its change event saves it and reloads the ratings)."""
    page.fill("#reader", name)
    page.click("#study-id")  # blur: keys go to the page again, not into the field


def test_rate_two_studies_restart_and_see_them(browser, reported_run):
    from playwright.sync_api import expect

    studies = sorted(p.name for p in (reported_run / "studies").iterdir())
    with running_review_server(reported_run) as base:
        page = open_page(browser, base)
        expect(page.locator("#study-id")).to_have_text(studies[0])
        expect(page.locator("#position")).to_have_text(f"1 / {len(studies)}")
        expect(page.locator("#wl")).to_contain_text("window 255")  # images loaded and drawn
        assert viewer_brightness(page, "#view-orig") > 20 and viewer_brightness(page, "#view-simpl") > 20
        expect(page.locator("#status")).to_contain_text("enter your name")  # asked for once, before rating
        page.keyboard.press("2")  # nothing is saved without a name: the page asks for it
        expect(page.locator("#status")).to_have_text("enter your name as Reader first")
        expect(page.locator("#reader")).to_be_focused()
        expect(page.locator("#progress")).to_have_text(f"0 of {len(studies)} rated")
        set_reader(page, "Dr A")
        expect(page.locator("#status")).to_have_text("not yet rated")
        page.keyboard.press("2")  # "partly", saved at once
        expect(page.locator("#status")).to_contain_text("saved ")
        page.keyboard.press("ArrowRight")
        expect(page.locator("#study-id")).to_have_text(studies[1])
        page.check("input[value=meniscus]")
        page.check("input[value=no]")
        page.fill("textarea[name=comment]", "meniscus lost after simplification")
        page.click("#save")
        expect(page.locator("#status")).to_contain_text("saved ")
        expect(page.locator("#progress")).to_have_text(f"2 of {len(studies)} rated")
        # A request for a file outside the run folder is refused, also from the page's origin.
        # (The client normalises "%2e%2e" to "/ingest/manifest.csv": an unknown route, 404.)
        secret = (reported_run / "ingest" / "manifest.csv").read_bytes()
        for path, status in [("/studies/%2e%2e/ingest/manifest.csv", 404), ("/studies/%252e%252e/ingest/manifest.csv", 403)]:
            response = page.request.get(base + path)
            assert response.status == status and secret not in response.body()
        assert page.request.get(base + "/studies/" + studies[0] + "/report.json").status == 404
        page.close()

    with running_review_server(reported_run) as base:  # restarted: state comes only from SQLite
        page = open_page(browser, base)  # a fresh browser profile: no reader yet
        expect(page.locator("#progress")).to_have_text(f"0 of {len(studies)} rated")
        set_reader(page, "Dr B")  # another reader sees none of Dr A's ratings
        expect(page.locator("#status")).to_have_text("not yet rated")
        expect(page.locator("#progress")).to_have_text(f"0 of {len(studies)} rated")
        set_reader(page, "Dr A")
        expect(page.locator("#progress")).to_have_text(f"2 of {len(studies)} rated")
        page.reload()  # the name is kept in the browser: not asked again
        expect(page.locator("#progress")).to_have_text(f"2 of {len(studies)} rated")
        assert page.input_value("#reader") == "Dr A"
        page.click("#study-id")
        assert page.is_checked("input[value=partly]")
        page.keyboard.press("j")
        expect(page.locator("#study-id")).to_have_text(studies[1])
        assert page.is_checked("input[value=no]") and page.is_checked("input[value=meniscus]")
        assert page.input_value("textarea[name=comment]") == "meniscus lost after simplification"
        page.select_option("#filter", "unrated")
        expect(page.locator("#position")).to_have_text(f"1 / {len(studies) - 2}")
        assert page.text_content("#study-id") not in studies[:2]
        expect(page.locator("#wl")).to_contain_text("window")
        # Zoom, pan and window/level act on both viewers; the shortcut "r" resets them.
        page.mouse.move(400, 400)
        page.mouse.wheel(0, -600)
        page.keyboard.down("Shift")
        page.mouse.move(400, 400)
        page.mouse.down()
        page.mouse.move(340, 440)
        page.mouse.up()
        page.keyboard.up("Shift")
        changed = page.text_content("#wl")
        assert "zoom 1.00" not in changed and "window 255" not in changed
        page.screenshot(path=str(SCREENSHOT_DIR / "simplebits_review_zoomed.png"))
        page.keyboard.press("r")
        expect(page.locator("#wl")).to_have_text("window 255 · level 128 · zoom 1.00×")
        page.select_option("#filter", "all")
        page.screenshot(path=str(SCREENSHOT_DIR / "simplebits_review.png"))
        page.close()


def test_cohort_report_renders(browser, reported_run):
    from synthetic_run import SIMPLIFY_NAME, make_sweep

    from pipeline.report.html import write_run_cohort_report

    index = write_run_cohort_report(reported_run, SIMPLIFY_NAME, sweep=make_sweep())
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(index.as_uri())
    total = len(list((reported_run / "studies").iterdir()))
    assert page.text_content("#g-count") == f"{total} of {total} studies shown"
    import pandas as pd

    positives = int((pd.read_csv(reported_run / "simplify" / SIMPLIFY_NAME / "predictions.csv")["effusion"] == 1).sum())
    page.select_option("#g-filter", "positive")
    assert 0 < positives < total and page.text_content("#g-count") == f"{positives} of {total} studies shown"
    page.select_option("#g-filter", "all")
    # Panels load from ../studies (relative links work from the file system).
    first = page.locator("#gallery img").first
    first.scroll_into_view_if_needed()
    page.wait_for_function("document.querySelector('#gallery img').naturalWidth > 0")  # file://: no CSP
    page.screenshot(path=str(SCREENSHOT_DIR / "simplebits_cohort_report.png"), full_page=True)
    page.close()


def test_study_view_shows_its_maps_beside_the_simplified_image(browser, explained_run):
    import io

    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect
    from synthetic_run import EXPLAIN_METHODS

    from pipeline.explain.run import read_map_rows
    from pipeline.run_folder import RunFolder

    studies = sorted(p.name for p in (explained_run / "studies").iterdir())
    with_maps = {row["study_id"] for row in read_map_rows(RunFolder(explained_run).explain("effusion"))}
    first = next(i for i, sid in enumerate(studies) if sid in with_maps)
    without = next(i for i, sid in enumerate(studies) if sid not in with_maps)
    with running_review_server(explained_run) as base:
        page = open_page(browser, base)
        for _ in range(first):
            page.keyboard.press("ArrowRight")
        expect(page.locator("#study-id")).to_have_text(studies[first])
        thumbnails = page.locator("#maps img")
        expect(thumbnails).to_have_count(len(EXPLAIN_METHODS))
        expect(page.locator("#maps figcaption")).to_have_text(["Integrated Gradients", "Grad-CAM"])
        expect(page.locator("#maps")).to_be_visible()
        for k in range(len(EXPLAIN_METHODS)):  # loaded and drawn: a colour overlay, not a broken-image icon
            shot = np.asarray(Image.open(io.BytesIO(thumbnails.nth(k).screenshot())).convert("RGB")).astype(float)
            assert shot.shape[0] >= 140 and shot.std() > 5
        page.screenshot(path=str(SCREENSHOT_DIR / "simplebits_review_maps.png"))
        for _ in range(abs(without - first)):
            page.keyboard.press("ArrowRight" if without > first else "ArrowLeft")
        expect(page.locator("#study-id")).to_have_text(studies[without])
        expect(page.locator("#maps")).to_be_hidden()
        expect(page.locator("#maps img")).to_have_count(0)
        page.close()


def test_full_resolution_original_and_difference_overlay(browser, reported_run):
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image
    from playwright.sync_api import expect
    from synthetic_run import SOURCE_SIZE

    manifest = pd.read_csv(reported_run / "ingest" / "manifest.csv", dtype={"study_id": str})
    has_source = dict(zip(manifest["study_id"], manifest["image_path"].map(lambda p: Path(p).is_file())))
    studies = sorted(p.name for p in (reported_run / "studies").iterdir())
    first = next(i for i, sid in enumerate(studies) if has_source[sid])

    def simplified_view() -> np.ndarray:
        shot = page.locator("#view-simpl").screenshot()
        return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)

    with running_review_server(reported_run) as base:
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(base + "/")
        for _ in range(first):
            page.keyboard.press("ArrowRight")
        expect(page.locator("#study-id")).to_have_text(studies[first])
        # The original drawn is the source at its native size, not the 32 px working image.
        expect(page.locator("#view-orig")).to_have_attribute("data-natural", f"{SOURCE_SIZE}x{SOURCE_SIZE}")
        expect(page.locator("#orig-size")).to_have_text(f"{SOURCE_SIZE} × {SOURCE_SIZE} px")
        expect(page.locator("#wl")).to_contain_text("window 255 · level 128")  # the DICOM's window
        plain = simplified_view()
        greyish = np.abs(plain[..., 0] - plain[..., 2]).mean()
        page.keyboard.press("d")
        expect(page.locator("#wl")).to_contain_text("difference shown")
        coloured = simplified_view()
        assert np.abs(coloured[..., 0] - coloured[..., 2]).mean() > greyish + 5  # red/blue where it changed
        page.screenshot(path=str(SCREENSHOT_DIR / "simplebits_review_fullres.png"))
        page.keyboard.press("d")
        expect(page.locator("#wl")).not_to_contain_text("difference")
        page.select_option("#filter", "positive")  # filters still work on the full-resolution page
        expect(page.locator("#position")).to_contain_text(" / ")
        page.close()
