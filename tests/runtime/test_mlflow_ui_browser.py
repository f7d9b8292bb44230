"""The MLflow UI in a real browser (Debian chromium via Playwright): the parent run, its nested stages and
a logged model with its linked metric, as a user of a real ``mlflow server`` sees them."""

from __future__ import annotations

import pytest
from browser_helpers import CHROMIUM, CHROMIUM_ARGS, SCREENSHOT_DIR, needs_chromium

from pipeline.models.classifiers import create_classifier, save_classifier
from pipeline.runtime.tracking import Tracker

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    needs_chromium,
]


def test_mlflow_ui_shows_the_parent_run_its_nested_stages_and_a_logged_model(tmp_path, mlflow_server):
    from playwright.sync_api import expect, sync_playwright

    weights = save_classifier(create_classifier("nf_cnn"), tmp_path / "model.safetensors", input_size=[32, 32])
    tracker = Tracker(tmp_path / "run", uri=mlflow_server, experiment="ui-test")
    with tracker.run("simplebits-pipeline"):
        with tracker.run("classify-effusion"):
            tracker.log_metrics({"final_val_auroc": 0.875})
            model = tracker.log_model("classifier", weights, name="classify-effusion")
        with tracker.run("independent-check-effusion"):
            tracker.log_metrics({"final_val_auroc": 0.75})
    experiment = f"{mlflow_server}/#/experiments/{tracker.experiment_id}"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"{experiment}/runs")
            parent = page.get_by_role("link", name="simplebits-pipeline", exact=True)
            expect(parent).to_be_visible(timeout=60_000)
            stages = [page.get_by_role("link", name=name, exact=True)
                      for name in ("classify-effusion", "independent-check-effusion")]
            for stage in stages:  # nested: folded under the parent until it is expanded
                expect(stage).to_have_count(0)
            parent.locator("xpath=ancestor::*[@role='gridcell'][1]").locator("button").first.click()
            for stage in stages:  # (classify-effusion twice: the run, and its model in the Models column)
                expect(stage.first).to_be_visible()
            page.screenshot(path=str(SCREENSHOT_DIR / "mlflow-nested-runs.png"))

            page.goto(f"{experiment}/models/{model.model_id}")
            expect(page.get_by_text("final_val_auroc").first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("0.875").first).to_be_visible()
            page.screenshot(path=str(SCREENSHOT_DIR / "mlflow-logged-model.png"))
        finally:
            browser.close()
