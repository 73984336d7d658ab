"""Preprocessing statistics are checked at load (runtime/artifact.py): a mean/std under which a
normalised pixel of [0, 1] would lie beyond ±MAX_NORMALISED is refused naming the field, even when
it is finite in float32 (std 1e-30 made pixels of ~1e30 and confident nonsense)."""

from __future__ import annotations

import pytest

from edgeexit.errors import ArtifactError
from edgeexit.runtime.artifact import MAX_NORMALISED, parse_preprocessing

BASE = {"in_chans": 3, "input_size": [32, 32]}


@pytest.mark.parametrize(
    "mean,std,match",
    [
        ([0.5, 0.5, 0.5], [0.2, 1e-30, 0.2], r"preprocessing\.std\[1\] \(1e-30\) puts normalised pixels at up to 5e"),
        ([0.5, 0.5, 0.5], [0.2, 0.2, 1e-6], r"preprocessing\.std\[2\]"),
        ([3e5, 0.5, 0.5], [1.0, 0.2, 0.2], r"preprocessing\.mean\[0\] \(3e\+05\)"),
    ],
)
def test_statistics_no_model_could_have_seen_are_refused_naming_the_field(mean, std, match):
    with pytest.raises(ArtifactError, match=match):
        parse_preprocessing(dict(BASE, mean=mean, std=std))


def test_real_statistics_and_the_training_clamp_still_load():
    imagenet = parse_preprocessing(dict(BASE, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
    assert imagenet.std == (0.229, 0.224, 0.225)
    clamp = parse_preprocessing(dict(BASE, mean=[0.0, 1.0, 0.5], std=[1e-3, 1e-3, 1e-3]))  # a constant folder
    assert max(abs(1 - 0.0) / 1e-3, 0.5 / 1e-3) <= MAX_NORMALISED and clamp.std[0] == 1e-3
