"""Resumable MLflow runs: a killed command, re-run, continues its run (one metric series), then FINISHED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.runtime.tracking import (
    PARENT_RUN_ENV,
    RESUMED_COUNT_TAG,
    RESUMED_FROM_STATUS_TAG,
    ParamConflictError,
    Tracker,
)

REPO = Path(__file__).resolve().parents[2]

#: One attempt of a training command: tracked run(s) with resume files, steps first..last, then maybe a kill.
ATTEMPT = r"""
import json, os, signal, sys, time
from pathlib import Path
from pipeline.runtime.tracking import Tracker

args = json.loads(sys.argv[1])
out = Path(args["out"])
tracker = Tracker(out, uri=args["uri"])

def train():
    with tracker.run("train", params={"train": {"lr": 0.001}}, tags={"task": "effusion"},
                     resume_file=out / "train" / "mlflow_run.json"):
        for step in range(args["first"], args["last"] + 1):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        if args["kill"] == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        if args["kill"] == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the handler raises before this ends
            sys.exit("SIGTERM did not unwind the run")

if args["parent"] == "same-process":
    with tracker.run("pipeline", params={"seed": 1}, resume_file=out / "mlflow_run.json"):
        train()
else:
    train()
"""


def attempt(uri: str, out: Path, first: int, last: int, kill: str | None = None, parent: str | None = None,
            env_parent: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop(PARENT_RUN_ENV, None)
    if env_parent:
        env[PARENT_RUN_ENV] = env_parent
    args = {"uri": uri, "out": str(out), "first": first, "last": last, "kill": kill, "parent": parent}
    return subprocess.run([sys.executable, "-c", ATTEMPT, json.dumps(args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def runs_by_name(client: MlflowClient, experiment_id: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in client.search_runs([experiment_id]):
        out.setdefault(run.info.run_name, []).append(run)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parent", [None, "same-process", "env"])
def test_sigkilled_run_resumes_as_one_finished_series(tmp_path, parent):
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out"
    tracker = Tracker(tmp_path, uri=uri, enabled=True)
    client = tracker.client
    env_parent = None
    if parent == "env":  # an orchestrator's parent run, open across both attempts of the stage
        env_parent = client.create_run(tracker.experiment_id, run_name="orchestrator").info.run_id

    first = attempt(uri, out, 1, 3, kill="SIGKILL", parent=parent, env_parent=env_parent)
    assert first.returncode == -signal.SIGKILL, first.stderr
    killed_id = json.loads((out / "train" / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(killed_id).info.status == "RUNNING"  # what kill -9 leaves behind

    second = attempt(uri, out, 4, 6, parent=parent, env_parent=env_parent)
    assert second.returncode == 0, second.stderr

    runs = runs_by_name(client, tracker.experiment_id)
    assert len(runs["train"]) == 1
    train = runs["train"][0]
    assert train.info.run_id == killed_id and train.info.status == "FINISHED"
    assert train.data.tags[RESUMED_COUNT_TAG] == "1" and train.data.tags[RESUMED_FROM_STATUS_TAG] == "RUNNING"
    assert train.data.params == {"train.lr": "0.001"} and train.data.tags["task"] == "effusion"
    history = client.get_metric_history(killed_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in history}[6] == pytest.approx(1 / 6)
    if parent == "same-process":
        assert len(runs["pipeline"]) == 1
        pipeline = runs["pipeline"][0]
        assert pipeline.info.status == "FINISHED" and pipeline.data.tags[RESUMED_COUNT_TAG] == "1"
        assert train.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
        assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == pipeline.info.run_id
    elif parent == "env":
        assert train.data.tags["mlflow.parentRunId"] == env_parent
    else:
        assert "mlflow.parentRunId" not in train.data.tags
        assert set(runs) == {"train"}


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_the_rerun_resumes_it(tmp_path):
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out"
    first = attempt(uri, out, 1, 2, kill="SIGTERM")
    assert first.returncode == 128 + signal.SIGTERM, first.stderr
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((out / "train" / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"

    tracker = Tracker(out, uri=uri, enabled=True)
    with tracker.run("train", params={"train": {"lr": 0.001}}, resume_file=out / "train" / "mlflow_run.json"):
        assert tracker.run_id == run_id
        tracker.log_metrics({"loss": 1 / 3}, step=3)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[RESUMED_FROM_STATUS_TAG] == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert len(client.search_runs([tracker.experiment_id])) == 1


def test_finished_run_in_resume_file_makes_a_new_run(tmp_path):
    tracker = Tracker(tmp_path, uri=f"sqlite:///{tmp_path / 'mlflow.db'}", enabled=True)
    resume = tmp_path / "out" / "mlflow_run.json"
    with tracker.run("train", params={"lr": 1}, resume_file=resume):
        first_id = tracker.run_id
        tracker.log_metrics({"loss": 1.0}, step=1)
    assert json.loads(resume.read_text())["run_id"] == first_id
    with tracker.run("train", params={"lr": 2}, resume_file=resume):  # a forced re-run may change params
        second_id = tracker.run_id
        tracker.log_metrics({"loss": 0.5}, step=1)
    assert second_id != first_id
    assert json.loads(resume.read_text())["run_id"] == second_id
    first, second = tracker.client.get_run(first_id), tracker.client.get_run(second_id)
    assert first.info.status == second.info.status == "FINISHED"
    assert first.data.params["lr"] == "1" and second.data.params["lr"] == "2"
    assert RESUMED_COUNT_TAG not in second.data.tags
    assert len(tracker.client.get_metric_history(first_id, "loss")) == 1


def test_disabled_tracker_reads_and_writes_no_resume_file(tmp_path):
    resume = tmp_path / "out" / "mlflow_run.json"
    tracker = Tracker(tmp_path, enabled=False)
    with tracker.run("train", params={"lr": 1}, resume_file=resume):
        tracker.log_metrics({"loss": 1.0}, step=1)
        assert tracker.run_id is None
    assert not resume.exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "mlflow.db").exists()
    resume.parent.mkdir()
    resume.write_text("not json")  # rank 0 wrote it; rank > 0 does not even read it
    with tracker.run("train", resume_file=resume):
        pass
    assert resume.read_text() == "not json"


def test_failed_run_resumes_and_a_changed_param_is_refused_by_name(tmp_path):
    tracker = Tracker(tmp_path, uri=f"sqlite:///{tmp_path / 'mlflow.db'}", enabled=True)
    resume = tmp_path / "mlflow_run.json"
    params = {"train": {"lr": 0.001, "epochs": 3}}
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.run("train", params=params, resume_file=resume):
            run_id = tracker.run_id
            tracker.log_metrics({"loss": 1.0}, step=1)
            raise RuntimeError("boom")
    assert tracker.client.get_run(run_id).info.status == "FAILED"

    changed = {"train": {"lr": 0.01, "epochs": 3}}
    with pytest.raises(ParamConflictError, match=r"'train\.lr'") as info:
        with tracker.run("train", params=changed, resume_file=resume):
            pytest.fail("a run with a changed param must not open")
    assert "\n" not in str(info.value) and run_id in str(info.value)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED" and RESUMED_COUNT_TAG not in run.data.tags  # left untouched
    assert tracker.run_id is None

    with tracker.run("train", params={"train": {"lr": 0.001, "epochs": 3, "batch": 8}}, resume_file=resume):
        assert tracker.run_id == run_id
        tracker.log_params({"train": {"epochs": 3}})  # equal: skipped
        with pytest.raises(ParamConflictError, match=r"'train\.epochs'"):
            tracker.log_params({"train": {"epochs": 4}})
        tracker.log_metrics({"loss": 0.5}, step=2)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.001", "train.epochs": "3", "train.batch": "8"}
    assert run.data.tags[RESUMED_COUNT_TAG] == "1" and run.data.tags[RESUMED_FROM_STATUS_TAG] == "FAILED"
    assert [m.step for m in tracker.client.get_metric_history(run_id, "loss")] == [1, 2]


def test_keyboard_interrupt_ends_the_run_killed(tmp_path):
    tracker = Tracker(tmp_path, uri=f"sqlite:///{tmp_path / 'mlflow.db'}", enabled=True)
    with pytest.raises(KeyboardInterrupt):
        with tracker.run("train", resume_file=tmp_path / "mlflow_run.json"):
            run_id = tracker.run_id
            raise KeyboardInterrupt
    assert tracker.client.get_run(run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's SIGTERM handler is gone


def test_resume_file_naming_no_usable_run_makes_a_new_run(tmp_path):
    tracker = Tracker(tmp_path, uri=f"sqlite:///{tmp_path / 'mlflow.db'}", enabled=True)
    resume = tmp_path / "mlflow_run.json"
    other = Tracker(tmp_path / "other", uri=f"sqlite:///{tmp_path / 'other.db'}", enabled=True)
    with other.run("train", resume_file=resume):  # another store: its id means nothing here
        foreign_id = other.run_id
    other.client.update_run(foreign_id, status="FAILED")  # resumable, were it in this store
    for content in (json.dumps({"run_id": foreign_id}), "{truncated", json.dumps({"run_id": "../x"})):
        resume.write_text(content)
        with tracker.run("train", resume_file=resume):
            new_id = tracker.run_id
        assert new_id != foreign_id and json.loads(resume.read_text())["run_id"] == new_id
    # an unfinished run with another name (another command's output folder reused) is not taken over
    tracker.client.update_run(new_id, status="FAILED")
    with tracker.run("evaluate", resume_file=resume):
        assert tracker.run_id != new_id
    assert len(tracker.client.search_runs([tracker.experiment_id])) == 4


def test_resumed_child_nests_under_the_parent_of_this_attempt(tmp_path):
    tracker = Tracker(tmp_path, uri=f"sqlite:///{tmp_path / 'mlflow.db'}", enabled=True)
    resume = tmp_path / "stage" / "mlflow_run.json"
    with tracker.run("pipeline"):
        with pytest.raises(ValueError):
            with tracker.run("stage", resume_file=resume):
                child_id = tracker.run_id
                tracker.log_metrics({"loss": 1.0}, step=1)
                raise ValueError("interrupted")
    with tracker.run("pipeline") as parent:
        new_parent = parent.run_id
        with tracker.run("stage", resume_file=resume):
            assert tracker.run_id == child_id
            tracker.log_metrics({"loss": 0.5}, step=2)
        assert tracker.run_id == new_parent
    child = tracker.client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == new_parent and child.info.status == "FINISHED"
    assert [m.step for m in tracker.client.get_metric_history(child_id, "loss")] == [1, 2]


def test_run_id_argument_still_reopens_that_run(tmp_path):
    tracker = Tracker(tmp_path, uri=f"sqlite:///{tmp_path / 'mlflow.db'}", enabled=True)
    with tracker.run("prior", params={"lr": 1}):
        run_id = tracker.run_id
        tracker.log_metrics({"bpd": 3.0}, step=1)
    with tracker.run("prior", run_id=run_id):
        assert tracker.run_id == run_id
        tracker.log_metrics({"bpd": 2.5}, step=2)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[RESUMED_COUNT_TAG] == "1"
    assert [m.step for m in tracker.client.get_metric_history(run_id, "bpd")] == [1, 2]
    with pytest.raises(ValueError, match="not both"):
        with tracker.run("prior", run_id=run_id, resume_file=tmp_path / "mlflow_run.json"):
            pass
