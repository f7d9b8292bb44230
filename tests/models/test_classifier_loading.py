"""Any classifier file behind its adapter: package checkpoints (old and new), plain state_dicts with key
prefixes, TorchScript, ``module:function`` factories, and the input/output adapter itself."""

import json

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121
from safetensors.torch import save_file

from pipeline.classifier_args import adapter_overrides
from pipeline.cli import build_parser
from pipeline.errors import UserError
from pipeline.models.adapter import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AdapterSpec,
    NetworkInput,
    adapt_input,
    binary_logits,
    merged,
)
from pipeline.models.classifiers import create_classifier, create_network, load_classifier, save_classifier
from pipeline.simplebits.matching import evidence_distance, matched_modules

SMALL_DENSENET = {"init_features": 4, "growth_rate": 4, "block_config": [1, 1]}


def small_densenet(in_channels: int = 1, outputs: int = 2) -> DenseNet121:
    torch.manual_seed(0)
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=outputs, **SMALL_DENSENET).eval()


@pytest.fixture
def x():
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------------
# Package checkpoints


@pytest.mark.parametrize("name,kwargs,prefix", [("nf_cnn", {"widths": [4, 8]}, ""),
                                                ("monai_resnet18", {"widen_factor": 0.25}, "net.")])
def test_checkpoints_written_before_adapters_keep_their_outputs(tmp_path, x, name, kwargs, prefix):
    """Old side-cars have no adapter; their networks ran behind (x-0.2)/0.3 (MONAI ones under ``net.``)."""
    torch.manual_seed(0)
    net = create_network(name, **kwargs).eval()
    state = {prefix + k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.json").write_text(json.dumps({"name": name, "kwargs": kwargs, "task": "effusion"}))
    loaded = load_classifier(tmp_path / "old.safetensors")
    assert torch.equal(loaded(x), net((x - 0.2) / 0.3))


def test_new_checkpoints_record_the_package_adapter(tmp_path, x):
    model = create_classifier("monai_resnet18", widen_factor=0.25).eval()
    save_classifier(model, tmp_path / "m.safetensors", task="effusion")
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["adapter"]["intensity"] == "mean_std" and meta["adapter"]["mean"] == [0.2]
    assert meta["name"] == "monai_resnet18" and meta["kwargs"] == {"widen_factor": 0.25}
    assert torch.equal(load_classifier(tmp_path / "m.safetensors")(x), model(x))


# --------------------------------------------------------------------------------------------------
# Plain state_dicts


@pytest.mark.parametrize("prefix", ["", "module.", "model.", "net.", "module.model."])
def test_plain_monai_state_dict_loads_with_any_prefix(tmp_path, x, prefix):
    net = small_densenet()
    torch.save({prefix + k: v for k, v in net.state_dict().items()}, tmp_path / "densenet.pth")
    loaded = load_classifier(tmp_path / "densenet.pth", "monai_densenet121", SMALL_DENSENET)
    assert torch.equal(loaded(x), net(x))  # and no normalisation it did not declare


def test_safetensors_state_dict_without_side_car_loads_given_the_network(tmp_path, x):
    net = small_densenet()
    save_file(net.state_dict(), str(tmp_path / "densenet.safetensors"))
    loaded = load_classifier(tmp_path / "densenet.safetensors", "monai_densenet121", SMALL_DENSENET)
    assert torch.equal(loaded(x), net(x))


def test_mismatched_weights_name_the_file_and_the_first_keys(tmp_path):
    torch.save(small_densenet().state_dict(), tmp_path / "densenet.pt")
    deeper = {**SMALL_DENSENET, "block_config": [1, 1, 1]}
    with pytest.raises(UserError, match=r"densenet.pt: weights do not fit classifier 'monai_densenet121': "
                                        r"missing features\.transition2\.\S+ \(and \d+ more\)"):
        load_classifier(tmp_path / "densenet.pt", "monai_densenet121", deeper)
    with pytest.raises(UserError, match=r"unexpected features\.\S+.*shape of features\.conv0\.weight: "
                                        r"\(4, 1, 7, 7\) in the file, \(8, 1, 7, 7\) in the network"):
        load_classifier(tmp_path / "densenet.pt", "monai_densenet121",
                        {"init_features": 8, "block_config": [1]})


# --------------------------------------------------------------------------------------------------
# TorchScript and factories


def test_torchscript_loads_for_scoring_and_is_refused_for_training(tmp_path, x):
    net = small_densenet()
    torch.jit.script(net).save(str(tmp_path / "densenet.pt"))
    loaded = load_classifier(tmp_path / "densenet.pt")
    assert loaded.scripted and torch.allclose(loaded(x), net(x), atol=1e-6)
    with pytest.raises(UserError, match="densenet.pt: a TorchScript classifier is audit-only"):
        load_classifier(tmp_path / "densenet.pt", trainable=True)


def test_torchscript_evidence_is_matched_at_the_network_input(tmp_path, x):
    torch.jit.script(small_densenet()).save(str(tmp_path / "densenet.pt"))
    loaded = load_classifier(tmp_path / "densenet.pt")
    assert [type(m) for m in matched_modules(loaded)] == [NetworkInput]
    assert float(evidence_distance(loaded, x, x).max()) == 0.0
    assert float(evidence_distance(loaded, x, x.flip(-1)).min()) > 0.0


def test_factory_builds_any_architecture(tmp_path, x):
    net = small_densenet()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    factory_kwargs = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, **SMALL_DENSENET}
    loaded = load_classifier(tmp_path / "w.pt", "monai.networks.nets:DenseNet121", factory_kwargs)
    assert torch.equal(loaded(x), net(x))
    with pytest.raises(UserError, match="w.pt: cannot import the classifier factory 'no_such_module:f'"):
        load_classifier(tmp_path / "w.pt", "no_such_module:f")


# --------------------------------------------------------------------------------------------------
# The adapter


def test_side_car_adapter_resizes_repeats_normalises_and_reads_one_sigmoid_output(tmp_path, x):
    net = small_densenet(in_channels=3, outputs=3)
    torch.save(net.state_dict(), tmp_path / "multi.pt")
    (tmp_path / "multi.json").write_text(json.dumps({
        "name": "monai.networks.nets:DenseNet121",
        "kwargs": {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, **SMALL_DENSENET},
        "adapter": {"input_size": [48, 48], "channels": 3, "intensity": "mean_std", "mean": IMAGENET_MEAN,
                    "std": IMAGENET_STD, "output": "sigmoid", "output_names": ["edema", "effusion", "mass"]},
    }))
    loaded = load_classifier(tmp_path / "multi.pt", task="effusion")
    resized = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False, antialias=False)
    direct = net((resized.repeat(1, 3, 1, 1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
                 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    p = torch.softmax(loaded(x), 1)[:, 1]
    assert torch.allclose(p, torch.sigmoid(direct[:, 1]), atol=1e-6)
    with pytest.raises(UserError, match="looked for 'sex'.*edema, effusion, mass"):
        load_classifier(tmp_path / "multi.pt", task="sex")
    by_index = load_classifier(tmp_path / "multi.pt", adapter={"output": "sigmoid", "output_index": 2})
    assert torch.allclose(torch.softmax(by_index(x), 1)[:, 1], torch.sigmoid(direct[:, 2]), atol=1e-6)


def test_resizing_is_differentiable_down_to_the_working_resolution():
    spec = AdapterSpec(input_size=(48, 48))
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    adapt_input(x, spec).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and float(x.grad.abs().sum()) > 0
    shrunk = adapt_input(torch.rand(1, 1, 96, 96), AdapterSpec(input_size=(24, 32)))
    assert shrunk.shape == (1, 1, 24, 32)


def test_intensity_range_maps_unit_interval_onto_the_declared_range():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    out = adapt_input(x, AdapterSpec(intensity="range", range=(-1024, 1024)))
    assert out.flatten().tolist() == [-1024.0, 0.0, 1024.0]


def test_single_logit_becomes_the_same_probability():
    z = torch.tensor([[-2.0], [0.0], [3.0]])
    logits = binary_logits(z, AdapterSpec(output="logit"), "f")
    assert torch.allclose(torch.softmax(logits, 1)[:, 1], torch.sigmoid(z[:, 0]))
    with pytest.raises(UserError, match="f: the network has 1 outputs but the adapter's output is softmax2"):
        binary_logits(z, AdapterSpec(), "f")


def test_overriding_an_aspect_replaces_it_whole():
    imagenet = AdapterSpec(channels=3, intensity="mean_std", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    ranged = merged(imagenet, {"intensity": "range", "range": [-1024, 1024]})
    assert ranged.intensity == "range" and ranged.mean == [0.0] and ranged.channels == 3


def test_command_line_flags_become_adapter_fields():
    args = build_parser().parse_args([
        "apply", "--ingest", "i", "--simplifier", "s", "--classifier", "c.pt", "--out", "o",
        "--classifier-arch", "monai_densenet121", "--classifier-input-size", "224x192",
        "--classifier-channels", "3", "--classifier-intensity", "range:-1024:1024",
        "--classifier-output", "sigmoid:effusion"])
    fields = adapter_overrides(args)
    assert fields == {"input_size": [224, 192], "channels": 3, "intensity": "range",
                      "range": [-1024.0, 1024.0], "output": "sigmoid", "output_name": "effusion"}
    assert AdapterSpec.model_validate(fields).output_name == "effusion"
    args = build_parser().parse_args(["apply", "--classifier-intensity", "imagenet",
                                      "--classifier-output", "bad"])
    with pytest.raises(UserError, match="--classifier-output: expected softmax2"):
        adapter_overrides(args)


def test_joint_training_reads_its_initial_weights_as_declared(monkeypatch, tmp_path):
    import pipeline.simplebits.joint as joint

    seen = {}
    def run_joint(ingest, out, config, force, mask_dir):
        seen["config"] = config
        return []

    monkeypatch.setattr(joint, "run_joint", run_joint)
    args = build_parser().parse_args([
        "simplify", "train", "--ingest", "i", "--out", str(tmp_path), "--classifier-init", "w.pt",
        "--classifier-arch", "monai_densenet121", "--classifier-kwargs", '{"init_features": 4}',
        "--classifier-intensity", "mean_std:0.5:0.25", "--independent", "c.pt"])
    assert args.func(args) == 0
    config = seen["config"]
    assert config.classifier_init == "w.pt" and config.classifier.name == "monai_densenet121"
    assert config.classifier.kwargs == {"init_features": 4}
    assert config.classifier_adapter == {"intensity": "mean_std", "mean": [0.5], "std": [0.25]}
