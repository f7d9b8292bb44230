from pipeline.runtime.tracking import PARENT_RUN_ENV, Tracker, sqlite_artifact_location


def test_stage_trackers_nest_under_the_orchestrators_parent_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent_tracker = Tracker(tmp_path, uri=uri, enabled=True)
    with parent_tracker.run("pipeline") as parent:
        monkeypatch.setenv(PARENT_RUN_ENV, parent.run_id)
        stage = Tracker(tmp_path / "stage", uri=uri, enabled=True)  # a separate object, as in a stage
        with stage.run("prior"):
            stage.log_metrics({"bpd": 3.0}, step=1)
            child_id = stage.run_id
    run = parent_tracker.client.get_run(child_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_tracker.client.search_runs(
        [parent_tracker.experiment_id], "attributes.run_name = 'pipeline'")[0].info.run_id
    assert run.data.metrics["bpd"] == 3.0


def test_sqlite_artifacts_live_beside_the_database(tmp_path):
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    assert sqlite_artifact_location(uri) == (tmp_path / "run" / "mlartifacts").as_uri()
    assert sqlite_artifact_location("http://127.0.0.1:5000") is None
