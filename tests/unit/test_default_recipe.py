"""The default recipe learns shape as well as colour from a small clean set it was never tuned on (issue #14).

Trained from scratch on ``tests/shapes30.py`` (30 colour x shape classes, none of them the demo's) with the
training loop's model, loss, optimizer, schedule, augmentation and default batch size and learning rate,
in-process; zero-shot accuracy over the 30 class prompts on images generated separately. ``bench/recipe.py``
compares the candidate recipes (and the scorer's top-60 % cut) on the same task; BENCHMARKS.md "Recipes".
"""

from __future__ import annotations

import pytest

from models.recipes import DEFAULT_RECIPE
from tests.shapes30 import make_shape_pairs, train_in_process, zeroshot

pytestmark = pytest.mark.slow

# Issue #14's target. A model that knows every colour and no shape gets 1 in 5 (a colour's 5 shapes).
TARGET_ZEROSHOT = 0.5
# No run may stay at colours only (at most 0.2): the failure a conv stem at PyTorch's init or a too high rate showed.
FLOOR_ZEROSHOT = 0.4
# One training says little: the same recipe and seed spread by ~0.05 between runs (the flips are random), and
# seeds by more; so three seeds, and the target on their mean (BENCHMARKS.md "Recipes": 0.48-0.61 over 9 runs).
SEEDS = (0, 1, 2)


def test_default_recipe_learns_shapes_on_a_held_out_task():
    import torch

    torch.set_num_threads(1)  # a shared 2-core machine: 2 OpenMP threads spin against other work
    test = make_shape_pairs(600, seed=1000, prefix="test")
    accuracy = [
        zeroshot(train_in_process(DEFAULT_RECIPE, make_shape_pairs(800, seed=s), epochs=15, seed=s), test)
        for s in SEEDS
    ]
    assert min(accuracy) >= FLOOR_ZEROSHOT, accuracy
    assert sum(accuracy) / len(accuracy) >= TARGET_ZEROSHOT, accuracy
