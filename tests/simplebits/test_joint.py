"""Joint training (setting a) on a synthetic distractor task, with a tiny Glow prior.

Task (32x32): the left half carries the label (a square darker or brighter than the grey
background), the right half is random texture unrelated to the label. The prior's ActNorm layers are
initialised on near-flat grey images, so texture costs many bits and flat grey few: simplification
should flatten the distractor and keep the label square.
"""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import pipeline.data.ingest as ingest_module
import pipeline.simplebits.joint as joint_module
from pipeline.data.store import CohortStore
from pipeline.models.bpd import bits_per_dim
from pipeline.models.classifiers import create_classifier, load_classifier
from pipeline.models.simplifier import Simplifier, load_simplifier
from pipeline.prior import save_prior
from pipeline.training.engine import StepContext
from pipeline.simplebits.joint import (
    JointConfig,
    dequantization_noise,
    evaluate_joint,
    gate_weights,
    lookahead_adamw,
    run_joint,
    simplifier_losses,
    simplify_batch,
    train_joint,
)

from toy_tasks import SIZE, distractor_cohort, tiny_prior


def tiny_config(lam: float, epochs: int = 12, **train) -> JointConfig:
    return JointConfig.model_validate({
        "task": "effusion", "device": "cpu",
        "classifier": {"name": "nf_cnn", "kwargs": {}},
        "simplifier": {"base_channels": 8, "levels": 3},
        "simplify": {"lam": lam},
        "augment": {"enabled": False},
        "train": {"epochs": epochs, "batch_size": 32, "simplifier_lr": 3e-3, "classifier_lr": 1e-3, **train},
        "independent": {"seed": 3, "model": {"name": "nf_cnn", "kwargs": {"widths": [8, 16]}}, "train": {"epochs": 1}},
        "evaluate": {"retrain_train": {"epochs": 1}},
        "tracking": {"enabled": False},
    })


@pytest.fixture(scope="module")
def prior():
    return tiny_prior()


@pytest.fixture(scope="module")
def cohorts():
    return distractor_cohort(256, 0), distractor_cohort(128, 1, "val")


@pytest.fixture(scope="module")
def trained(prior, cohorts):
    """lam=0 and lam=2 runs on the same data: 10-40 s each on one CPU thread, depending on machine load."""
    train, val = cohorts
    out = {}
    for lam in (0.0, 2.0):
        result = train_joint(train, val, prior, tiny_config(lam))
        metrics, _ = evaluate_joint(result.simplifier, result.classifier, prior, val.images,
                                    val.labels("effusion"), torch.device("cpu"))
        out[lam] = (result, metrics, simplify_batch(result.simplifier, val.images, torch.device("cpu")))
    return out


def half_std(images: torch.Tensor, half: str) -> float:
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    part = x[..., SIZE // 2:] if half == "right" else x[..., :SIZE // 2]
    return float(part.std(dim=(1, 2, 3)).mean())


def test_the_prior_charges_texture_and_not_flat_grey(prior, cohorts):
    _, val = cohorts
    assert bits_per_dim(prior, val.float(), "midpoint").mean() > 10 * bits_per_dim(
        prior, torch.full((2, 1, SIZE, SIZE), 0.5), "midpoint").mean()


@pytest.mark.slow
def test_lambda_zero_does_not_compress(trained):
    _, metrics, _ = trained[0.0]
    assert metrics["bpd_simpl"] > 0.9 * metrics["bpd_orig"]


@pytest.mark.slow
def test_lambda_positive_lowers_bpd(trained):
    _, metrics, _ = trained[2.0]
    assert metrics["bpd_simpl"] < 0.2 * metrics["bpd_orig"]
    assert metrics["bpd_simpl"] < 0.2 * trained[0.0][1]["bpd_simpl"]


@pytest.mark.slow
def test_distractor_goes_flat_and_the_task_is_still_solved(trained, cohorts):
    _, val = cohorts
    _, metrics, simplified = trained[2.0]
    assert metrics["accuracy_simpl"] >= 0.9
    assert metrics["auroc_simpl"] >= 0.95
    assert half_std(simplified, "right") < 0.4 * half_std(val.images, "right")
    # with lam=0 the distractor stays
    assert half_std(trained[0.0][2], "right") > 0.8 * half_std(val.images, "right")


@pytest.mark.slow
def test_history_has_the_logged_metrics(trained):
    result, _, _ = trained[2.0]
    assert len(result.history) == 12 and result.stopped_epoch == 12
    assert {"train_ce_simpl", "train_bpd_loss", "train_gate", "train_skipped_simplifier", "val_auroc_orig",
            "val_auroc_simpl", "val_bpd_orig", "val_bpd_simpl"} <= set(result.history[-1])
    assert result.metrics == {k: v for k, v in result.history[-1].items() if k != "epoch"}


def test_gate_weights():
    losses = torch.tensor([0.0, 0.05, 0.1, 0.5])
    assert torch.allclose(gate_weights(losses, 0.1), torch.tensor([1.0, 0.5, 0.0, 0.0]))


def test_lookahead_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.995), weight_decay=0.1)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for _ in range(3):  # build up real optimiser state first
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    predicted = lookahead_adamw(params, dict(zip(params, grads)), optimizer, {p: n for n, p in params.items()})
    for p, g in zip(params.values(), grads):
        p.grad = g
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.allclose(predicted[name], p, atol=1e-6), name


def test_dequantization_noise_belongs_to_the_sample_not_the_batch():
    """What makes two ranks compute one process's bpd term: a sample's noise does not depend on which
    batch (rank) takes it or where in the batch it sits."""
    table = torch.rand(10, 2, generator=torch.Generator().manual_seed(0))
    ctx = StepContext(0, 0, 1, 1, torch.Generator(), torch.device("cpu"), 0, 1, lambda k: table[:, :k])
    whole = dequantization_noise(ctx, torch.tensor([4, 7, 1, 2]), (1, 3, 3))
    halves = [dequantization_noise(ctx, torch.tensor(p), (1, 3, 3)) for p in ([4, 7], [2, 1])]
    assert torch.equal(whole, torch.cat([halves[0], halves[1].flip(0)]))
    assert whole.shape == (4, 1, 3, 3) and ((whole >= 0) & (whole < 1)).all()
    assert not torch.equal(whole[0], whole[1])


def test_lookahead_gradient_reaches_the_simplifier(prior):
    torch.manual_seed(0)
    x = distractor_cohort(16, 3).float()
    y = distractor_cohort(16, 3).labels("effusion")
    simplifier = Simplifier(base_channels=8, levels=3, init="zero_alpha")
    with torch.no_grad():
        simplifier.alpha.fill_(0.5)  # a random U-Net scaled by a non-zero alpha: every weight gets a gradient
    classifier = create_classifier("nf_cnn")
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3)
    for _ in range(2):  # non-empty optimiser state, as in training
        optimizer.zero_grad()
        F.cross_entropy(classifier(x), y).backward()
        optimizer.step()
    params = list(simplifier.parameters())

    def grads(lookahead: bool, term: str) -> list[torch.Tensor]:
        objective = tiny_config(0.0).simplify.model_copy(update={"lookahead": lookahead})
        losses = simplifier_losses(simplifier, classifier, optimizer, prior, x, y, objective, 0.0, seed=1)
        if not losses[term].requires_grad:  # no path from S to this loss at all
            return [torch.zeros_like(p) for p in params]
        out = torch.autograd.grad(losses[term], params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]

    orig_ahead = grads(True, "orig")
    assert sum(float(g.abs().sum()) for g in orig_ahead) > 0
    assert all(float(g.abs().sum()) == 0 for g in grads(False, "orig"))  # originals alone ignore S
    simple_ahead, simple_plain = grads(True, "simple"), grads(False, "simple")
    assert sum(float(g.abs().sum()) for g in simple_ahead) > 0
    assert any(not torch.allclose(a, b) for a, b in zip(simple_ahead, simple_plain))
    assert len(optimizer.state) > 0 and classifier.training  # the look-ahead left the classifier untouched


def test_resume_continues_exactly(prior, cohorts, tmp_path):
    train, val = distractor_cohort(64, 5), distractor_cohort(32, 6, "val")
    straight = train_joint(train, val, prior, tiny_config(1.0, epochs=3))
    checkpoint = tmp_path / "checkpoint.pt"
    train_joint(train, val, prior, tiny_config(1.0, epochs=2), checkpoint_path=checkpoint)
    resumed = train_joint(train, val, prior, tiny_config(1.0, epochs=3), checkpoint_path=checkpoint)
    assert len(resumed.history) == 3
    for (name, a), b in zip(straight.simplifier.state_dict().items(), resumed.simplifier.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_train_joint_needs_a_single_lambda(prior, cohorts):
    with pytest.raises(ValueError, match="one simplify.lam"):
        train_joint(*cohorts, prior, tiny_config(1.0).model_copy(
            update={"simplify": tiny_config(1.0).simplify.model_copy(update={"lam": [0.0, 1.0]})}))


def test_run_joint_sweep_writes_outputs_and_skips_finished_runs(prior, tmp_path, monkeypatch):
    cohorts = {"train": distractor_cohort(64, 7), "val": distractor_cohort(32, 8, "val"),
               "test": distractor_cohort(16, 9, "test")}
    monkeypatch.setattr(ingest_module, "load_cohorts", lambda ingest, splits, task: {s: cohorts[s] for s in splits})
    prior_path = save_prior(prior, tmp_path / "prior")
    config = tiny_config(1.0, epochs=1).model_copy(update={"prior": str(prior_path)})
    config = config.model_copy(update={"simplify": config.simplify.model_copy(update={"lam": [0.0, 1.0]})})
    out = tmp_path / "joint-effusion"
    summaries = run_joint("unused-ingest-dir", out, config)

    assert [s["lam"] for s in summaries] == [0.0, 1.0]
    sweep = pd.read_csv(out / "sweep.csv")
    assert list(sweep["lam"]) == [0.0, 1.0] and {"method", "mean_bpd", "auroc"} <= set(sweep.columns)
    run_dir = out / "lam-1"
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert list(predictions.columns) == ["study_id", "split", "label", "p_orig", "p_simpl", "bpd_orig", "bpd_simpl"]
    assert len(predictions) == 48 and set(predictions["split"]) == {"val", "test"}
    # simplified images of the reported splits in one store (no per-study files), train not among them
    store = CohortStore.open(run_dir / "simplified")
    assert sorted(store.study_ids) == sorted(predictions["study_id"])
    assert not list((run_dir / "simplified").glob("std-*.npy")) and not (run_dir / "simplified_train").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["lam"] == 1.0 and "val_auroc_simpl" in metrics and "test_bpd_simpl" in metrics
    # the same yardsticks as the audit: attainable saving, independent check, retraining, baselines
    for key in ("val_fraction_of_attainable_saving", "val_independent_auroc_simpl", "test_independent_auroc_orig",
                "val_retrain_auroc_simpl", "val_retrain_auroc_orig"):
        assert 0.0 <= metrics[key] <= 1.0 or key.endswith("saving"), key
    baselines = pd.read_csv(run_dir / "baselines.csv")
    assert list(baselines["method"]) == ["simplebits-joint", "blur", "jpeg", "downsample"]
    assert {"retrain_auroc_simpl", "independent_auroc", "mean_bpd"} <= set(baselines.columns)
    assert baselines["retrain_auroc_simpl"][0] == pytest.approx(metrics["val_retrain_auroc_simpl"])
    assert (run_dir / "config.resolved.yaml").is_file()

    simplifier = load_simplifier(run_dir / "simplifier.safetensors")
    classifier = load_classifier(run_dir / "classifier.safetensors")
    study = cohorts["test"].study_ids[0]
    stored = torch.from_numpy(store.read(store.slots([study])))[:, None]
    with torch.no_grad():
        simplified = simplifier(cohorts["test"].float()[:1])
        p = torch.softmax(classifier(stored.float() / 255), 1)[0, 1]
    assert torch.equal(stored, torch.round(simplified * 255).to(torch.uint8))  # the stored image is S(x)
    row = predictions[predictions["study_id"] == study].iloc[0]
    assert float(p) == pytest.approx(row["p_simpl"], abs=1e-5)

    mtime = (run_dir / "metrics.json").stat().st_mtime_ns
    # finished runs: nothing is trained again, not even the independent check
    monkeypatch.setattr(joint_module, "independent_classifier",
                        lambda *args: pytest.fail("trained the independent check for finished runs"))
    assert [s["lam"] for s in run_joint("unused-ingest-dir", out, config)] == [0.0, 1.0]
    assert (run_dir / "metrics.json").stat().st_mtime_ns == mtime


def test_shipped_yaml_equals_the_code_defaults():
    from pipeline.config import default_config_path, load_config

    assert load_config(JointConfig, default_config_path("simplify_joint")) == JointConfig()


def test_classifier_can_start_from_weights_trained_on_originals(prior, tmp_path):
    from pipeline.models.classifiers import save_classifier

    pretrained = create_classifier("nf_cnn")
    path = save_classifier(pretrained, tmp_path / "model.safetensors", "nf_cnn")
    train, val = distractor_cohort(32, 10), distractor_cohort(16, 11, "val")
    config = tiny_config(1.0, epochs=0).model_copy(update={"classifier_init": str(path)})
    result = train_joint(train, val, prior, config)
    for name, value in pretrained.state_dict().items():
        assert torch.equal(result.classifier.state_dict()[name], value), name

    wrong = config.model_copy(update={"classifier": config.classifier.model_copy(update={"kwargs": {"widths": [4]}})})
    with pytest.raises(ValueError, match="model.safetensors.*do not fit"):
        train_joint(train, val, prior, wrong)
