import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.models.classifiers import (
    ScaledStdConv2d,
    create_classifier,
    list_classifiers,
    load_classifier,
    register_classifier,
    save_classifier,
)


def test_registry_lists_the_builtin_networks():
    assert {"nf_wrn_16_2", "nf_cnn", "monai_densenet121", "monai_resnet18", "monai_resnet18_gn"} <= set(
        list_classifiers()
    )


def test_unknown_name_lists_the_choices():
    with pytest.raises(KeyError, match="nf_wrn_16_2"):
        create_classifier("resnet_nonexistent")


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_classifier(create_classifier.__globals__["nf_cnn"])


@pytest.mark.parametrize("name,kwargs,size", [
    ("nf_wrn_16_2", {}, 32),
    ("nf_wrn_16_2", {"stem_stride": 2, "activation": "shifted_softplus"}, 64),
    ("nf_cnn", {}, 64),
    ("monai_resnet18", {}, 32),
    ("monai_resnet18_gn", {}, 64),
])
def test_forward_shapes(name, kwargs, size):
    model = create_classifier(name, **kwargs).eval()
    logits = model(torch.rand(3, 1, size, size))
    assert logits.shape == (3, 2)
    assert torch.isfinite(logits).all()


def test_monai_densenet_builds():
    model = create_classifier("monai_densenet121", num_classes=2).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)


@pytest.mark.parametrize("name,kwargs", [("nf_wrn_16_2", {"dropout": 0.0}), ("monai_resnet18_gn", {})])
def test_batchnorm_free_networks_treat_examples_independently(name, kwargs):
    model = create_classifier(name, **kwargs).train()
    x = torch.rand(4, 1, 32, 32)
    together = model(x)
    alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_scaled_std_conv_keeps_unit_variance():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(64, 64, 3, bias=False)
    with torch.no_grad():
        out = conv(torch.randn(8, 64, 16, 16))
    assert 0.7 < float(out[:, :, 1:-1, 1:-1].std()) < 1.3


def test_save_and_load_round_trip(tmp_path):
    model = create_classifier("nf_cnn", widths=(8, 16)).eval()
    path = save_classifier(model, tmp_path / "model.safetensors", "nf_cnn", {"widths": [8, 16]},
                           task="effusion", input_size=[32, 32], metrics={"val_auroc": 0.9})
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["name"] == "nf_cnn" and meta["task"] == "effusion" and meta["metrics"]["val_auroc"] == 0.9
    loaded = load_classifier(path)
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_load_a_torch_state_dict_trained_elsewhere(tmp_path):
    """A DDP-style checkpoint (``module.`` prefix, wrapped in a dict) loads given the network name, and
    gets no input normalisation it did not declare (the package's (x-0.2)/0.3 is not assumed)."""
    model = create_classifier("nf_cnn").eval()
    state = {"state_dict": {f"module.{k}": v for k, v in model.net.state_dict().items()}}
    torch.save(state, tmp_path / "elsewhere.pt")
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(load_classifier(tmp_path / "elsewhere.pt", "nf_cnn")(x), model.net(x))
    declared = {"intensity": "mean_std", "mean": [0.2], "std": [0.3]}
    assert torch.equal(load_classifier(tmp_path / "elsewhere.pt", "nf_cnn", adapter=declared)(x), model(x))


def test_load_errors_name_the_file(tmp_path):
    torch.save(create_classifier("nf_cnn").state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="w.pt.*nf_wrn_16_2"):
        load_classifier(tmp_path / "w.pt", "nf_wrn_16_2")
    with pytest.raises(UserError, match="no w.json"):
        load_classifier(tmp_path / "w.pt")
    with pytest.raises(UserError, match="missing.pt"):
        load_classifier(tmp_path / "missing.pt", "nf_cnn")
