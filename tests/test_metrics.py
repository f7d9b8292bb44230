import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.metrics import accuracy, auroc, binary_metrics


def test_auroc_perfect_inverted_and_chance():
    y = [0, 0, 1, 1]
    assert auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * y, 1)  # coarse rounding makes many ties
    assert auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auroc_takes_tensors():
    y = torch.tensor([0, 1, 0, 1])
    p = torch.tensor([0.2, 0.6, 0.7, 0.9])
    assert auroc(y, p) == pytest.approx(0.75)


def test_auroc_single_class_is_nan():
    assert math.isnan(auroc([1, 1, 1], [0.1, 0.5, 0.9]))


def test_accuracy_threshold():
    assert accuracy([0, 1, 1, 0], [0.2, 0.7, 0.4, 0.5]) == 0.5
    assert accuracy([0, 1, 1, 0], [0.2, 0.7, 0.4, 0.5], threshold=0.35) == 0.75
    assert accuracy([0, 1, 1, 0], [0.2, 0.7, 0.4, 0.3], threshold=0.35) == 1.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        accuracy([0, 1], [0.1, float("nan")])


def test_binary_metrics_prefix():
    out = binary_metrics([0, 1], [0.3, 0.8], prefix="val_")
    assert out == {"val_auroc": 1.0, "val_accuracy": 1.0, "val_n": 2.0}
