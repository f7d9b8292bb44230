"""Burned-in marks: drawn inside the image near a corner, never carrying identifiers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.demo.distractors import MARKER_LETTERS, TAG_TEXTS, distractor_mask, sample_distractor


@pytest.mark.parametrize("size", [32, 64, 128])
def test_sampled_marks_are_visible_and_near_a_corner(size):
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(40):
        distractor = sample_distractor(rng)
        kinds.add(distractor.kind)
        mask = distractor_mask(distractor, size)
        assert mask.shape == (size, size) and mask.dtype == bool
        rows, cols = np.nonzero(mask)
        assert len(rows) >= 5
        # Within the outer quarter vertically (top or bottom band) and clear of the image centre.
        assert rows.max() < size * 0.3 or rows.min() > size * 0.7
        assert not mask[size // 3: 2 * size // 3, size // 3: 2 * size // 3].any()
    assert kinds == {"marker", "text"}


def test_texts_are_generic_markings():
    for text in (*MARKER_LETTERS, *TAG_TEXTS):
        assert text.isalpha() and text.isupper() and len(text) <= 8


def test_same_draw_gives_same_mask():
    a = distractor_mask(sample_distractor(np.random.default_rng(3)), 64)
    b = distractor_mask(sample_distractor(np.random.default_rng(3)), 64)
    assert np.array_equal(a, b)
