import random

import numpy as np
import torch

from pipeline.runtime.checkpoint import load_checkpoint, save_checkpoint


def test_checkpoint_restores_model_optimizer_step_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, models={"m": model}, optimizers={"o": opt}, step=17, extra={"best": 1.5})
    expected = (torch.rand(3), np.random.rand(), random.random())

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    torch.manual_seed(123)
    info = load_checkpoint(path, models={"m": fresh}, optimizers={"o": fresh_opt})

    assert info == {"step": 17, "extra": {"best": 1.5}}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    # RNG streams continue exactly where the checkpoint was taken
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1]
    assert random.random() == expected[2]


def test_checkpoint_is_plain_tensors(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "c.pt", models={"m": model}, step=0)
    torch.load(tmp_path / "c.pt", weights_only=True)  # raises if anything needs pickle
