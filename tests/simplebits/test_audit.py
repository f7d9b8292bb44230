"""Post-hoc audit (setting c) and its evidence-matching machinery, on a synthetic distractor task.

Task (32x32): the left half carries the label (a square darker or brighter than the grey
background), the right half is random texture unrelated to the label. The tiny prior's ActNorm
layers are initialised on near-flat grey images, so texture costs many bits and flat grey few.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import pipeline.data.ingest as ingest_module
from pipeline.data.ingest import write_ingest_folder
from pipeline.data.store import CohortStore
from pipeline.models.classifiers import create_classifier, save_classifier
from pipeline.models.simplifier import create_simplifier, load_simplifier
from pipeline.prior import save_prior
from pipeline.simplebits import audit
from pipeline.simplebits.audit import (
    AuditConfig,
    AuditTrainConfig,
    audit_command,
    audit_study_command,
    run_audit,
    scheduled,
    simplify_study,
)
from pipeline.simplebits.matching import (
    evidence_distance,
    expected_grad_loss,
    gate,
    match_evidence,
    matched_modules,
    reference_evidence,
)
from pipeline.training.classifier import ClassifyConfig, fit_classifier

from toy_tasks import SIZE, distractor_cohort, tiny_prior
TASK = "effusion"


def write_distractor_ingest(root, sizes: dict[str, int], seed: int = 0):
    """An ingest folder (store, status, manifest) holding distractor-task splits of the given sizes."""
    parts = [distractor_cohort(n, seed + k, split) for k, (split, n) in enumerate(sizes.items())]
    frame = pd.concat([p.frame for p in parts], ignore_index=True)
    ids = [f"{i:08x}" for i in range(len(frame))]  # manifests hold pseudonyms: std-<hex>
    manifest = pd.DataFrame({
        "study_id": [f"std-{i}" for i in ids], "patient_id": [f"pat-{i}" for i in ids],
        "image_path": "/none.png",
        "view": "PA", "sex": "F", "age": 50.0, "effusion": frame[TASK].astype(str), "split": frame["split"],
        "source": "demo",
    })
    return write_ingest_folder(root, manifest, torch.cat([p.images for p in parts]))


def stored_image(root, study_id: str) -> np.ndarray:
    """One study's uint8 (H, W) image from the store at ``root``."""
    store = CohortStore.open(root)
    return store.read(store.slots([study_id]))[0]


def tiny_config(lam: float = 2.0, epochs: int = 6, **overrides) -> AuditConfig:
    data = {
        "task": TASK,
        "device": "cpu",
        "simplifier": {"base_channels": 8, "levels": 3},
        "audit": {"lam": lam},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 3e-3},
        "per_study": {"steps": 80},
        "augment": {"enabled": False},
        "independent": {
            "seed": 3,
            "model": {"name": "nf_cnn", "kwargs": {"widths": [8, 16]}},
            "train": {"epochs": 3},
        },
        "tracking": {"enabled": False},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return AuditConfig.model_validate(data)


@pytest.fixture(scope="module")
def prior():
    return tiny_prior()


@pytest.fixture(scope="module")
def cohorts():
    return distractor_cohort(256, 0), distractor_cohort(128, 1, "val")


@pytest.fixture(scope="module")
def frozen(cohorts):
    """A classifier trained on the originals elsewhere: the model under audit."""
    train, val = cohorts
    config = ClassifyConfig.model_validate(
        {
            "device": "cpu",
            "model": {"name": "nf_cnn", "kwargs": {}},
            "train": {"epochs": 3, "batch_size": 32},
            "augment": {"enabled": False},
            "tracking": {"enabled": False},
        }
    )
    result = fit_classifier(train.images, train.labels(TASK), val.images, val.labels(TASK), config)
    assert result.metrics["val_auroc"] > 0.95  # a classifier worth auditing
    return result.model.eval()


@pytest.fixture(scope="module")
def audited(cohorts, frozen, prior):
    train, val = cohorts
    return run_audit(train, val, frozen, prior, tiny_config())


# --------------------------------------------------------------------------------------------------
# Matching machinery


def test_matched_modules_are_the_weight_layers():
    model = create_classifier("nf_cnn")
    assert len(matched_modules(model)) == 4  # three convs and the head
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        matched_modules(torch.nn.ReLU())


def test_expected_grad_surrogate_has_the_documented_logit_gradient():
    logits = torch.randn(5, 2, requires_grad=True)
    targets = torch.tensor([0, 1, 1, 0, 1])
    (grad,) = torch.autograd.grad(expected_grad_loss(logits, targets), logits)
    expected = 0.5 * (torch.softmax(logits, 1) + 0.5) - F.one_hot(targets, 2)
    assert torch.allclose(grad, expected.detach(), atol=1e-6)
    # no vanishing: even a confidently right example keeps a gradient of at least 1/4 per logit
    confident = torch.tensor([[20.0, -20.0]], requires_grad=True)
    (g,) = torch.autograd.grad(expected_grad_loss(confident, torch.tensor([0])), confident)
    assert g.abs().min() >= 0.24


@pytest.mark.parametrize("kind", ["normed_sse", "cosine"])
def test_distance_is_zero_for_identical_inputs_and_grows_with_perturbation(kind):
    torch.manual_seed(0)
    model = create_classifier("nf_cnn").eval()
    x = distractor_cohort(6, 2).float()
    noise = torch.randn_like(x)
    distances = [
        evidence_distance(model, x, (x + s * noise).clamp(0, 1), kind).mean() for s in (0.0, 0.02, 0.1, 0.3)
    ]
    assert float(distances[0]) == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_match_keeps_the_graph_to_the_simplified_image():
    model = create_classifier("nf_cnn").eval()
    x = distractor_cohort(4, 2).float()
    reference = reference_evidence(model, x)
    x_simple = (0.5 * x + 0.25).requires_grad_(True)
    match = match_evidence(model, x_simple, reference)
    (grad,) = torch.autograd.grad(match.distance.sum(), x_simple)
    assert grad.abs().sum() > 0
    assert match.per_module.shape == (4, 4)
    assert torch.equal(reference.targets, model(x).argmax(1))  # default: the classifier's own decision


def test_gate_opens_only_where_matched_and_consistent():
    distance = torch.tensor([0.05, 0.05, 0.3, 0.1999])
    consistent = torch.tensor([True, False, True, True])
    assert torch.equal(gate(distance, consistent, tau=0.2), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    ramp = gate(torch.tensor([0.1, 0.15, 0.2]), torch.ones(3, dtype=torch.bool), tau=0.2, margin=0.1)
    assert torch.allclose(ramp, torch.tensor([1.0, 0.5, 0.0]))


# --------------------------------------------------------------------------------------------------
# Amortized audit


def test_audit_keeps_the_frozen_decision_and_lowers_bpd(audited):
    m = audited.metrics
    assert m["val_bpd_simpl"] < 0.5 * m["val_bpd_orig"]
    assert m["val_decision_agreement"] >= 0.85
    assert m["val_auroc_simpl"] >= 0.9
    assert m["val_evidence_distance"] > 0  # something was changed


def test_audit_reports_the_independent_check(audited):
    m = audited.metrics
    assert audited.independent is not None
    for key in ("independent_auroc_orig", "independent_auroc_simpl", "independent_accuracy_simpl"):
        assert 0.0 <= m[key] <= 1.0, key
    assert len(audited.history) == 6
    assert {"train_match", "train_kl", "train_bpd_loss", "train_gate", "val_matched_fraction"} <= set(
        audited.history[-1]
    )


def test_audit_leaves_the_frozen_classifier_untouched(cohorts, frozen, prior):
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    train, val = cohorts
    run_audit(train, val, frozen, prior, tiny_config(epochs=1), independent=frozen)
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_lambda_zero_keeps_bits(cohorts, frozen, prior):
    train, val = cohorts
    result = run_audit(train, val, frozen, prior, tiny_config(lam=0.0, epochs=2), independent=frozen)
    assert result.metrics["val_bpd_simpl"] > 0.9 * result.metrics["val_bpd_orig"]


def test_resume_continues_exactly(frozen, prior, tmp_path):
    train, val = distractor_cohort(64, 5), distractor_cohort(32, 6, "val")
    straight = run_audit(train, val, frozen, prior, tiny_config(epochs=3), independent=frozen)
    checkpoint = tmp_path / "checkpoint.pt"
    # a zero time budget stops the first run after one epoch, as a killed job would
    interrupted = run_audit(
        train,
        val,
        frozen,
        prior,
        tiny_config(epochs=3, train={"max_minutes": 0.0}),
        checkpoint_path=checkpoint,
        independent=frozen,
    )
    assert len(interrupted.history) == 1
    resumed = run_audit(
        train, val, frozen, prior, tiny_config(epochs=3), checkpoint_path=checkpoint, independent=frozen
    )
    assert len(resumed.history) == 3
    for (name, a), b in zip(
        straight.simplifier.state_dict().items(), resumed.simplifier.state_dict().values()
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_schedule_decays_lr_and_warms_up_lam():
    train = AuditTrainConfig(lr=1e-3, min_lr_fraction=0.1, lam_warmup_fraction=0.5)
    assert scheduled(train, 2.0, 0, 100) == pytest.approx((1e-3, 0.0))
    lr_mid, lam_mid = scheduled(train, 2.0, 25, 100)
    assert lam_mid == pytest.approx(1.0) and 1e-4 < lr_mid < 1e-3
    assert scheduled(train, 2.0, 100, 100) == pytest.approx((1e-4, 2.0))
    assert scheduled(AuditTrainConfig(lam_warmup_fraction=0.0), 2.0, 0, 100)[1] == 2.0


@pytest.mark.parametrize("init", ["zero_head", "zero_alpha"])
def test_identity_init_keeps_the_image_and_zero_head_trains_the_unet_at_once(init):
    torch.manual_seed(0)
    simplifier = create_simplifier(base_channels=8, levels=3, init=init)
    x = torch.randint(0, 256, (2, 1, 32, 32)).float() / 255
    out = simplifier(x)
    assert torch.equal(out, x)
    out.sub(0.5).pow(2).sum().backward()
    head_grad = simplifier.unet.head.weight.grad
    assert (head_grad is not None and head_grad.abs().sum() > 0) == (init == "zero_head")


# --------------------------------------------------------------------------------------------------
# Per-study audit


def test_per_study_lowers_bpd_and_keeps_the_prediction(cohorts, frozen, prior):
    _, val = cohorts
    for index in range(3):
        # tau 0.2: direct pixel optimisation tolerates a looser gate than the amortized default
        result = simplify_study(val.images[index], frozen, prior, tiny_config(audit={"tau": 0.2}))
        m = result.metrics
        assert result.simplified.dtype == torch.uint8 and result.simplified.shape == (1, 1, SIZE, SIZE)
        assert m["gate_opened"] == 1.0
        assert m["bpd_simpl"] < 0.7 * m["bpd_orig"]
        assert (m["p_simpl"] >= 0.5) == (m["p_orig"] >= 0.5)
        assert len(result.history) == 80


# --------------------------------------------------------------------------------------------------
# The command's outputs


def test_audit_command_writes_outputs_and_skips_when_done(cohorts, frozen, prior, tmp_path, monkeypatch):
    parts = {
        "train": distractor_cohort(64, 7),
        "val": distractor_cohort(32, 8, "val"),
        "test": distractor_cohort(16, 9, "test"),
    }
    def fake_load_cohort(ingest, split=None, task=None):
        return parts[split] if split else parts["val"]

    monkeypatch.setattr(ingest_module, "load_cohorts", lambda ingest, splits, task: {s: parts[s] for s in splits})
    monkeypatch.setattr(audit, "load_cohort", fake_load_cohort)
    prior_path = save_prior(prior, tmp_path / "prior")
    weights = save_classifier(frozen, tmp_path / "elsewhere.safetensors", "nf_cnn")
    # a classifier trained elsewhere: no .json next to it, the network and its input convention come
    # from the config
    (tmp_path / "elsewhere.json").unlink()
    declared = {"intensity": "mean_std", "mean": [0.2], "std": [0.3]}
    config = tiny_config(epochs=1, evaluate={"retrain": True, "retrain_train": {"epochs": 1}}).model_copy(
        update={
            "prior": str(prior_path),
            "classifiers": [audit.ClassifierSpec(path=str(weights), name="nf_cnn", adapter=declared)],
        }
    )
    # demo-cohort ground truth: the texture half as the "distractor", label-correlated in train only
    cohort_dir = tmp_path / "cohort"
    (cohort_dir / "masks").mkdir(parents=True)
    distractor = np.zeros((SIZE, SIZE), dtype=bool)
    distractor[10:20, 20:28] = True
    lung = np.zeros_like(distractor)
    lung[2:30, 2:14] = True
    fluid = np.zeros_like(distractor)
    fluid[5:11, 5:11] = True
    for study_id in parts["val"].study_ids + parts["test"].study_ids:
        np.savez(cohort_dir / "masks" / f"{study_id}.npz", fluid=fluid, lung=lung, distractor=distractor)
    reported = parts["val"].study_ids + parts["test"].study_ids
    pd.DataFrame(
        {
            "study_id": parts["train"].study_ids + reported,
            "distractor_correlated": [1] * len(parts["train"]) + [0] * len(reported),
            "distractor_present": [1] * len(parts["train"]) + [i % 2 for i in range(len(reported))],
            "distractor_kind": "marker",
        }
    ).to_csv(cohort_dir / "ground_truth.csv", index=False)
    out = tmp_path / "audit-effusion"
    summary = audit_command("unused", out, config, mask_dir=cohort_dir / "masks")

    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns)[:7] == [
        "study_id",
        "split",
        "label",
        "p_orig",
        "p_simpl",
        "bpd_orig",
        "bpd_simpl",
    ]
    assert {"evidence_distance", "distractor_retention", "sign_retention"} <= set(predictions.columns)
    assert len(predictions) == 48 and set(predictions["split"]) == {"val", "test"}
    # the simplified images: a store with one slot per reported study, no per-study files
    assert not list((out / "simplified").glob("std-*")) and not (out / "simplified_train").exists()
    assert sorted(CohortStore.open(out / "simplified").study_ids) == sorted(
        parts["val"].study_ids + parts["test"].study_ids
    )
    image = stored_image(out / "simplified", parts["test"].study_ids[0])
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["setting"] == "audit" and "val_fraction_of_attainable_saving" in metrics
    assert "independent_auroc_simpl" in summary and "val_retrain_auroc_orig" in summary
    assert metrics["val_correlated_in_training"] is True
    assert "val_mean_distractor_retention_marker" in metrics
    assert isinstance(metrics["test_shortcut_kept"], bool)
    for key in ("pull_orig", "pull_simpl", "pull_p_orig", "pull_p_simpl"):
        assert np.isfinite(metrics[f"val_distractor_{key}"]), key
    assert np.isfinite(metrics["val_mean_distractor_retention"]) and np.isfinite(
        metrics["val_mean_sign_retention"]
    )
    baselines = pd.read_csv(out / "baselines.csv")
    assert list(baselines["method"]) == ["simplebits-audit", "blur", "jpeg", "downsample"]
    assert {"auroc", "mean_bpd", "strength", "retrain_auroc_simpl", "independent_auroc"} <= set(baselines.columns)
    assert baselines["auroc"][0] == pytest.approx(metrics["val_auroc_simpl"])
    assert baselines["mean_bpd"][0] == pytest.approx(metrics["val_bpd_simpl"])
    # every row carries the ground-truth retention, the SimpleBits row the same as the split's
    for column in ("mean_distractor_retention", "mean_distractor_retention_marker", "mean_sign_retention"):
        assert baselines[column].notna().all(), column
        assert baselines[column][0] == pytest.approx(metrics[f"val_{column}"])
    simplifier = load_simplifier(out / "simplifier.safetensors")
    with torch.no_grad():
        simplified = torch.round(simplifier(parts["test"].float()[:1]) * 255).to(torch.uint8)[0, 0].numpy()
    assert np.array_equal(simplified, image)

    mtime = (out / "metrics.json").stat().st_mtime_ns
    audit_command("unused", out, config)
    assert (out / "metrics.json").stat().st_mtime_ns == mtime

    study = parts["val"].study_ids[2]
    record = audit_study_command("unused", out, study, config)
    assert record["study_id"] == study and (out / "per_study" / f"{study}.json").is_file()
    assert np.load(out / "per_study" / f"{study}.npy").shape == (SIZE, SIZE)
    with pytest.raises(ValueError, match="not in the ingest cache"):
        audit_study_command("unused", out, "std-missing", config)


def test_per_study_audit_reads_only_its_study(frozen, prior, tmp_path, monkeypatch):
    """Auditing one study of a large cohort must not read the cohort: one slot of the store, no more."""
    ingest = write_distractor_ingest(tmp_path / "ingest", {"train": 40, "val": 20, "test": 10})
    prior_path = save_prior(prior, tmp_path / "prior")
    weights = save_classifier(frozen, tmp_path / "frozen.safetensors", "nf_cnn")
    config = tiny_config(per_study={"steps": 3}).model_copy(
        update={"prior": str(prior_path), "classifiers": [audit.ClassifierSpec(path=str(weights))]}
    )
    read_slots = []
    original_read = CohortStore.read

    def counting_read(self, slots):
        read_slots.append(len(slots))
        return original_read(self, slots)

    monkeypatch.setattr(CohortStore, "read", counting_read)
    study = f"std-{40 + 7:08x}"  # the eighth validation study
    record = audit_study_command(ingest, tmp_path / "out", study, config)
    assert read_slots == [1]
    assert record["study_id"] == study and record["label"] in (0, 1)
    assert np.load(tmp_path / "out" / "per_study" / f"{study}.npy").dtype == np.uint8


def test_an_audit_needs_a_classifier():
    with pytest.raises(ValueError, match="at least one classifier"):
        audit.load_frozen_classifiers([], torch.device("cpu"))


def test_cli_builds_the_classifier_ensemble(monkeypatch, tmp_path):
    from pipeline.cli import build_parser
    from pipeline.errors import UserError

    seen = {}
    monkeypatch.setattr(
        audit,
        "audit_command",
        lambda ingest, out, config, force, mask_dir: (
            seen.update(config=config, mask_dir=mask_dir) or {"lam": config.audit.lam}
        ),
    )
    argv = [
        "simplify",
        "audit",
        "--ingest",
        "in",
        "--out",
        str(tmp_path),
        "--task",
        "sex",
        "--classifier",
        "a.safetensors",
        "--classifier",
        "b.pt",
        "--classifier-arch",
        "nf_wrn_16_2",
        "--independent",
        "c.safetensors",
        "--masks",
        "m",
        "--set",
        "audit.lam=4",
    ]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    config = seen["config"]
    assert [(c.path, c.name) for c in config.classifiers] == [
        ("a.safetensors", "nf_wrn_16_2"),
        ("b.pt", "nf_wrn_16_2"),
    ]
    assert config.task == "sex" and config.audit.lam == 4.0 and config.independent.path == "c.safetensors"
    assert seen["mask_dir"] == "m"
    with pytest.raises(UserError, match="--classifier"):
        args = build_parser().parse_args(["simplify", "audit", "--ingest", "in", "--out", str(tmp_path)])
        args.func(args)
    with pytest.raises(UserError, match="one per --classifier"):
        args = build_parser().parse_args(
            argv + ["--classifier-arch", "nf_cnn", "--classifier-arch", "nf_cnn"]
        )
        args.func(args)


def test_shipped_config_matches_the_defaults():
    from pipeline.config import default_config_path, load_config

    assert load_config(AuditConfig, default_config_path("simplify_audit")) == AuditConfig()
