"""Proof of learning (issue #4): the tiny config trains from scratch on the phantom within 10 minutes on CPU and then
segments and names held-out findings (training/learning_check.py; numbers in docs/training.md)."""

import numpy as np
import pytest

from dataset.prompts import NO_ABNORMALITY
from training.learning_check import dice, names_organs


def test_dice_follows_the_empty_mask_rules():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    b[0, :2] = True
    assert dice(a, b) == 0.0
    a[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


def test_organ_naming_needs_every_organ_or_the_refusal():
    assert names_organs("Findings 1: A cyst in the Liver. Findings 2: a mass in the spleen.", {"liver", "spleen"})
    assert not names_organs("A cyst in the liver.", {"liver", "spleen"})
    assert names_organs(NO_ABNORMALITY, set())
    assert not names_organs("A cyst in the liver.", set())
