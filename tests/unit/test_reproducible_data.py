"""The training data's random order and flips are a function of the seed, the epoch and the rows, nothing else
(``tasks.train.data.augment_batch``): the part of a reproducible training that needs no Ray."""

from __future__ import annotations

import numpy as np

from tasks.train.data import augment_batch


def batch(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "pixel_values": rng.random((n, 3, 8, 8), dtype=np.float32),
        "input_ids": rng.integers(0, 100, (n, 5)),
        "attention_mask": np.ones((n, 5), dtype=np.int64),
    }


def augmented(seed: int, epoch: int, data_seed: int = 0) -> dict[str, np.ndarray]:
    return augment_batch(batch(seed=data_seed), seed=seed, epoch=epoch)


def same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_the_same_seed_epoch_and_rows_give_the_same_order_and_flips():
    assert same(augmented(seed=3, epoch=1), augmented(seed=3, epoch=1))


def test_another_seed_or_epoch_gives_another_order():
    first = augmented(seed=3, epoch=1)
    assert not same(first, augmented(seed=4, epoch=1))
    assert not same(first, augmented(seed=3, epoch=2))
    # A negative seed is a seed too, distinct from its absolute value.
    assert not same(augmented(seed=-3, epoch=1), first)


def test_the_rows_stay_whole_rows_and_some_images_are_flipped():
    data, out = batch(), augmented(seed=5, epoch=0)
    order = [int(np.flatnonzero((data["input_ids"] == row).all(axis=1))[0]) for row in out["input_ids"]]
    assert sorted(order) == list(range(64)) and order != list(range(64))
    flipped = [
        np.array_equal(out["pixel_values"][i], data["pixel_values"][j][..., ::-1])
        for i, j in enumerate(order)
    ]
    kept = [np.array_equal(out["pixel_values"][i], data["pixel_values"][j]) for i, j in enumerate(order)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54  # about half


def test_other_rows_draw_another_order():
    # Two batches of one epoch (the content is part of the draw): not the same permutation of their rows.
    a, b = augmented(seed=3, epoch=1, data_seed=0), augmented(seed=3, epoch=1, data_seed=1)
    ra, rb = batch(seed=0), batch(seed=1)
    order_a = [int(np.flatnonzero((ra["input_ids"] == r).all(axis=1))[0]) for r in a["input_ids"]]
    order_b = [int(np.flatnonzero((rb["input_ids"] == r).all(axis=1))[0]) for r in b["input_ids"]]
    assert order_a != order_b
