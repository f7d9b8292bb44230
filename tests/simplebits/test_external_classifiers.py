"""Classifiers trained elsewhere, audited and applied end to end through ``simplebits``.

Three networks are trained here on a tiny square-detection cohort, each with its own input convention,
and saved the way other tools save them: (a) a MONAI DenseNet-121 as a plain ``state_dict`` (``model.``
prefix, declared on the command line), (b) the same network as TorchScript (also the independent
check), (c) a 3-output sigmoid network at 96 px with ImageNet normalisation whose effusion output is
index 1 (declared in its side-car JSON). The audit's ``val_auroc_orig`` and apply's per-study
``p_orig`` must equal the model scored directly on the same images with the convention done by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121

from pipeline.cli import main
from pipeline.data.ingest import load_cohort
from pipeline.metrics import auroc
from pipeline.models.adapter import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.classifiers import load_classifier, save_classifier
from pipeline.prior import save_prior
from pipeline.simplebits.joint import JointConfig, joint_models
from toy_tasks import tiny_prior

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cohort_fixtures import write_square_ingest  # noqa: E402

SIZE = 32
DENSENET = {"init_features": 4, "growth_rate": 4, "block_config": [1, 1]}
TINY = [
    "device=cpu", "tracking.enabled=false",
    "simplifier.base_channels=4", "simplifier.levels=2", "simplifier.max_channels=8",
    "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=16",
    "evaluate.baselines=[blur]", "evaluate.match_subsample=8", "evaluate.retrain=false",
]
APPLY = ["--split", "val", "--task", "effusion", "--device", "cpu", "--num-workers", "0", "--no-mlflow"]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def imagenet_96(x: torch.Tensor) -> torch.Tensor:
    """(c)'s convention by hand: 96 px (bilinear, antialiased when shrinking), 3 channels, ImageNet."""
    x = F.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False, antialias=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.repeat(1, 3, 1, 1) - mean) / std


def train_briefly(net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss) -> torch.nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(40):
        optimizer.zero_grad()
        loss(net(inputs), targets).backward()
        optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    ingest = write_square_ingest(root / "ingest", {"train": 48, "val": 24, "test": 8}, size=SIZE)
    train, val = load_cohort(ingest, split="train"), load_cohort(ingest, split="val")
    x_train, y_train = to_unit(train.images[np.arange(len(train))]), train.labels("effusion")
    x_val, y_val = to_unit(val.images[np.arange(len(val))]), val.labels("effusion")

    torch.manual_seed(0)
    densenet = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2, **DENSENET)
    train_briefly(densenet, x_train, y_train, F.cross_entropy)
    torch.save({f"model.{k}": v for k, v in densenet.state_dict().items()}, root / "densenet.pt")  # (a)
    torch.jit.script(densenet).save(str(root / "densenet_ts.pt"))  # (b)

    torch.manual_seed(1)
    multi_kwargs = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, **DENSENET}
    multi = DenseNet121(**multi_kwargs)
    # output 1 is effusion; 0 its opposite and 2 noise, so reading the wrong output cannot pass
    noise = torch.randint(0, 2, y_train.shape, generator=torch.Generator().manual_seed(2))
    targets = torch.stack([1 - y_train, y_train, noise], 1).float()
    train_briefly(multi, imagenet_96(x_train), targets, F.binary_cross_entropy_with_logits)
    torch.save(multi.state_dict(), root / "multi.pt")  # (c), declared by its side-car
    (root / "multi.json").write_text(json.dumps({
        "name": "monai.networks.nets:DenseNet121", "kwargs": multi_kwargs,
        "adapter": {"input_size": [96, 96], "channels": 3, "intensity": "mean_std", "mean": IMAGENET_MEAN,
                    "std": IMAGENET_STD, "output": "sigmoid", "output_index": 1},
    }))
    with torch.no_grad():
        direct = {"densenet": torch.softmax(densenet(x_val), 1)[:, 1],
                  "multi": torch.sigmoid(multi(imagenet_96(x_val))[:, 1])}
    prior = save_prior(tiny_prior(), root / "prior")
    return {"root": root, "ingest": ingest, "prior": prior, "val": val, "y_val": y_val, "direct": direct}


def audit_then_apply(world, name: str, classifier: Path, flags: list[str], extra: list[str] = ()) -> tuple:
    root = world["root"]
    overrides = [item for value in TINY for item in ("--set", value)]
    inputs = ["--ingest", str(world["ingest"]), "--classifier", str(classifier), *flags,
              "--prior", str(world["prior"])]
    assert main(["simplify", "audit", *inputs, "--out", str(root / f"audit-{name}"), *extra, *overrides]) == 0
    metrics = json.loads((root / f"audit-{name}" / "metrics.json").read_text())
    simplifier = str(root / f"audit-{name}" / "simplifier.safetensors")
    assert main(["apply", *inputs, "--simplifier", simplifier, "--out", str(root / f"apply-{name}"),
                 *APPLY]) == 0
    predictions = pd.read_csv(root / f"apply-{name}" / "predictions.csv").set_index("study_id")
    p_apply = torch.tensor(predictions.loc[world["val"].study_ids, "p_orig"].to_numpy(), dtype=torch.float32)
    return metrics, p_apply


@pytest.mark.parametrize("case", ["state_dict", "torchscript", "multi_label"])
def test_external_classifier_is_audited_and_applied_as_scored_directly(world, case):
    root, y_val = world["root"], world["y_val"]
    flags, extra, model = {
        "state_dict": (["--classifier-arch", "monai_densenet121",
                        "--classifier-kwargs", json.dumps(DENSENET)],
                       ["--set", "independent.enabled=false"], "densenet"),
        "torchscript": ([], ["--independent", str(root / "densenet_ts.pt")], "densenet"),
        "multi_label": ([], ["--set", "independent.enabled=false"], "multi"),
    }[case]
    files = {"state_dict": "densenet.pt", "torchscript": "densenet_ts.pt", "multi_label": "multi.pt"}
    classifier = root / files[case]
    direct = world["direct"][model]
    expected = auroc(y_val.numpy(), direct.numpy())
    assert expected > 0.8  # a classifier worth auditing; reading the wrong output would fall far below

    metrics, p_apply = audit_then_apply(world, case, classifier, flags, extra)
    assert metrics["val_auroc_orig"] == pytest.approx(expected, abs=1e-9)
    assert torch.allclose(p_apply, direct, atol=1e-5)
    if case == "torchscript":  # the independent check read through the same adapter
        assert metrics["independent_auroc_orig"] == pytest.approx(expected, abs=1e-9)


def test_weights_that_do_not_fit_end_in_one_line_with_exit_status_2(world, capsys):
    root = world["root"]
    wrong = json.dumps({**DENSENET, "init_features": 8})
    status = main(["simplify", "audit", "--ingest", str(world["ingest"]),
                   "--classifier", str(root / "densenet.pt"),
                   "--classifier-arch", "monai_densenet121", "--classifier-kwargs", wrong,
                   "--prior", str(world["prior"]), "--out", str(root / "audit-wrong"), "--set", "device=cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith(f"simplebits: error: {root / 'densenet.pt'}: weights do not fit classifier "
                               "'monai_densenet121': ")
    assert "shape of features.conv0.weight: (4, 1, 7, 7) in the file, (8, 1, 7, 7) in the network" in lines[0]


def test_joint_training_refuses_torchscript_and_takes_plain_state_dicts(world, capsys):
    root = world["root"]
    status = main(["simplify", "train", "--ingest", str(world["ingest"]), "--classifier-init",
                   str(root / "densenet_ts.pt"), "--prior", str(world["prior"]), "--out", str(root / "joint"),
                   "--set", "device=cpu", "--set", "tracking.enabled=false",
                   "--set", "independent.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "a TorchScript classifier is audit-only" in err[0]

    # a plain state_dict (``model.`` prefix) starts joint training behind the adapter declared for it
    config = JointConfig.model_validate({
        "classifier": {"name": "monai_densenet121", "kwargs": DENSENET},
        "classifier_init": str(root / "densenet.pt"), "classifier_adapter": {"intensity": "unit"}})
    _, classifier = joint_models(config, torch.device("cpu"))
    x_val = to_unit(world["val"].images[np.arange(len(world["val"]))])
    with torch.no_grad():
        p = torch.softmax(classifier.eval()(x_val), 1)[:, 1]
    assert torch.allclose(p, world["direct"]["densenet"], atol=1e-6)
    saved = save_classifier(classifier, root / "joint-classifier.safetensors")  # re-saved with its adapter
    assert torch.equal(load_classifier(saved)(x_val), classifier(x_val))
