"""Weights files -> a network's parameters: reading a state_dict and fitting its keys to the network.

Weights trained elsewhere rarely carry exactly the network's key names: DataParallel adds ``module.``,
Lightning ``model.``, wrappers ``net.``/``backbone.``, and this package's former wrapper put MONAI
networks under ``net.``. Rather than guessing from a list, :func:`fit_state_dict` looks for the pair of
key prefixes (one stripped from the file's keys, one from the network's) under which both key sets
are equal; whatever still differs is reported by name and shape in one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.errors import UserError

# BatchNorm's step counter: not used in eval mode, and often dropped by exports
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors or a torch file (``weights_only=True``: no arbitrary pickles).

    Also accepts a checkpoint dict with a ``state_dict``/``model`` entry.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classifier weights not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise UserError(f"{path}: not a readable safetensors file ({err})") from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for foreign or pickled content
            raise UserError(f"{path}: not a weights-only torch state_dict ({err})") from err
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: does not contain a state_dict of tensors")
    return dict(state)


def _dot_prefixes(key: str) -> list[str]:
    """``"a.b.c"`` -> ``["", "a.", "a.b."]``: the prefixes a wrapper could have added."""
    parts = key.split(".")
    return [".".join(parts[:i]) + ("." if i else "") for i in range(len(parts))]


def _strip(keys: Iterable[str], prefix: str) -> dict[str, str]:
    """``{key without prefix: key}`` of the keys that start with ``prefix``."""
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def _required(keys: Iterable[str]) -> set[str]:
    return {k for k in keys if not k.endswith(OPTIONAL_SUFFIXES)}


def align_keys(state_keys: list[str], network_keys: list[str]) -> tuple[str, str]:
    """``(file_prefix, network_prefix)`` under which the two key sets agree best (exactly, if they can).

    Candidates are the dot prefixes of each side's shortest key (the one least likely to belong to a
    wrapper's extra module); ties go to the shortest prefixes.
    """
    if not state_keys or not network_keys:
        return "", ""
    best, best_score = ("", ""), (-1, 0)
    for file_prefix in _dot_prefixes(min(state_keys, key=len)):
        stripped_file = _strip(state_keys, file_prefix)
        for network_prefix in _dot_prefixes(min(network_keys, key=len)):
            stripped_net = _strip(network_keys, network_prefix)
            common = len(_required(stripped_file) & _required(stripped_net))
            exact = (_required(stripped_file) == _required(stripped_net)
                     and len(stripped_file) == len(state_keys) and len(stripped_net) == len(network_keys))
            score = (int(exact) * 10**9 + common, -len(file_prefix) - len(network_prefix))
            if score > best_score:
                best, best_score = (file_prefix, network_prefix), score
    return best


def _first(keys: list[str]) -> str:
    """The first key (in the order of its state_dict: the earliest layer) and how many more there are."""
    extra = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{keys[0]}{extra}"


def fit_state_dict(network: nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                   architecture: str) -> None:
    """Load ``state`` into ``network`` whatever key prefix either side carries.

    Raises a one-line :class:`UserError` naming ``source`` and the first missing and unexpected keys
    and shape mismatches when the weights do not fit ``architecture``.
    """
    expected = network.state_dict()
    file_prefix, network_prefix = align_keys(list(state), list(expected))
    stripped_file = _strip(state, file_prefix)
    stripped_net = _strip(expected, network_prefix)
    problems = []
    missing = [k for k in stripped_net if k not in stripped_file and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if not k.startswith(file_prefix)]
    unexpected += [k for k in stripped_file if k not in stripped_net]
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    mismatched = [k for k in stripped_net
                  if k in stripped_file and state[stripped_file[k]].shape != expected[stripped_net[k]].shape]
    if mismatched:
        key = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        problems.append(f"shape of {key}: {tuple(state[stripped_file[key]].shape)} in the file, "
                        f"{tuple(expected[stripped_net[key]].shape)} in the network{more}")
    if problems:
        raise UserError(f"{source}: weights do not fit classifier {architecture!r}: {'; '.join(problems)}")
    renamed = {network_prefix + k: state[file_key] for k, file_key in stripped_file.items()}
    network.load_state_dict(renamed, strict=False)
