"""A one-worker training in the driver (no Ray): when it applies, its in-process tensors, its own checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tasks.train import checkpoints
from tasks.train.data import InProcessTensors
from tasks.train.driver import trains_in_driver
from vlforge.settings import Settings


def _blocks(sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Blocks whose rows carry their global index in ``input_ids[:, 0]`` (pixels [n, 3, 4, 4])."""
    out, start = [], 0
    for n in sizes:
        ids = np.arange(start, start + n, dtype=np.int64)
        out.append(
            {
                "input_ids": np.stack([ids, ids], 1),
                "pixel_values": np.random.default_rng(start).random((n, 3, 4, 4), "f4"),
            }
        )
        start += n
    return out


def _epoch(tensors: InProcessTensors, batch_size: int) -> list[int]:
    return [int(i) for b in tensors.iter_torch_batches(batch_size=batch_size) for i in b["input_ids"][:, 0]]


def test_in_process_tensors_give_every_row_once_an_epoch_in_a_new_order_drawn_from_the_seed():
    tensors = InProcessTensors(_blocks([64, 64, 64, 40, 64]), seed=3, flip=True)
    first, second = _epoch(tensors, 16), _epoch(tensors, 16)
    assert len(tensors) == 296
    # Full batches only (drop_last): 296 rows give 18 batches of 16; each row at most once an epoch.
    assert len(first) == len(second) == 288 and len(set(first)) == 288
    assert first != second  # a new order every epoch
    again = InProcessTensors(_blocks([64, 64, 64, 40, 64]), seed=3, flip=True)
    assert _epoch(again, 16) == first and _epoch(again, 16) == second  # the same seed, the same orders
    other = InProcessTensors(_blocks([64, 64, 64, 40, 64]), seed=4, flip=True)
    assert _epoch(other, 16) != first


def test_in_process_tensors_keep_the_last_partial_batch_when_asked():
    tensors = InProcessTensors(_blocks([10]), seed=0, flip=False)
    sizes = [len(b["input_ids"]) for b in tensors.iter_torch_batches(batch_size=4, drop_last=False)]
    assert sizes == [4, 4, 2]


def test_a_one_worker_training_runs_in_the_driver_unless_a_cluster_or_the_setting_says_otherwise():
    local = Settings(storage="/tmp/unused")
    assert trains_in_driver(local, 1)
    assert not trains_in_driver(local, 2)  # several workers: Ray Train's worker group
    assert not trains_in_driver(Settings(storage="/tmp/unused", ray_address="127.0.0.1:6379"), 1)
    assert not trains_in_driver(Settings(storage="/tmp/unused", local_training=False), 1)


def _write(step: int):
    def write(folder: str) -> None:
        with open(os.path.join(folder, "state.txt"), "w") as fh:
            fh.write(str(step))

    return write


def test_checkpoints_keep_the_two_newest_and_resume_from_the_newest(tmp_path):
    root = str(tmp_path / "run")
    assert checkpoints.latest(root) is None
    for step in (2, 4, 6):
        saved = checkpoints.save(root, step, _write(step), {"loss": 1.0 / step, "epoch": 1})
        assert (tmp_path / "run" / os.path.basename(saved.uri) / "state.txt").read_text() == str(step)
    assert sorted(p for p in os.listdir(root) if p.startswith("checkpoint_")) == [
        "checkpoint_step_000004",
        "checkpoint_step_000006",
    ]
    latest = checkpoints.latest(root)
    assert latest.step == 6 and latest.uri.endswith("checkpoint_step_000006")


def test_a_failed_checkpoint_write_leaves_the_previous_one_in_force(tmp_path):
    root = str(tmp_path / "run")
    checkpoints.save(root, 2, _write(2), {})

    def broken(folder: str) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoints.save(root, 4, broken, {})
    assert checkpoints.latest(root).step == 2


@pytest.mark.parametrize("ray_step,expected", [(3, 4), (8, 8)])
def test_resume_takes_the_newest_of_ours_and_ray_trains_by_step(tmp_path, ray_step, expected):
    """A training begun on Ray Train workers goes on in the driver from Ray's newest checkpoint, and back."""
    root = tmp_path / "run"
    checkpoints.save(str(root), 4, _write(4), {})
    snapshot = {
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026", "metrics": {"step": ray_step}}
    }
    (root / checkpoints.RAY_SNAPSHOT).write_text(json.dumps(snapshot))
    latest = checkpoints.latest(str(root))
    assert latest.step == expected
    assert latest.uri.endswith("checkpoint_2026" if expected == ray_step else "checkpoint_step_000004")
