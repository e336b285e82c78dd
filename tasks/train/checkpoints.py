"""Checkpoints that a training in the driver process writes into its run folder, and the newest one to resume.

Ray Train's local mode (``TorchTrainer`` with ``num_workers=0``: the training function runs in the driver, with no
worker actor) keeps the last reported checkpoint in memory only; persisting it is ours. A checkpoint is a folder
``<root>/checkpoint_step_NNNNNN/`` (the recipe's files and ``train_state.pt``), complete before
``local_checkpoints.json`` names it, so a driver killed while writing one leaves the previous one in force. The two
newest are kept, as Ray Train's ``CheckpointConfig(num_to_keep=2)`` keeps its own.

A resume starts from the newest checkpoint by step among these and Ray Train's (the latest one its
``checkpoint_manager_snapshot.json`` names, in the same folder), so a training begun on Ray Train workers goes on in
the driver and the other way around (the mode follows the settings, not the run).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from vlforge import storage

MANIFEST = "local_checkpoints.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's CheckpointManager state, in the run folder
KEEP = 2


@dataclass(frozen=True)
class Saved:
    uri: str  # the checkpoint's folder (local path or remote URI)
    step: int  # the optimizer steps it holds


def save(root: str, step: int, write: Callable[[str], None], metrics: dict) -> Saved:
    """Write a checkpoint at ``step`` with ``write(folder)``, then name it in the manifest and drop the oldest."""
    name = f"checkpoint_step_{step:06d}"
    uri = storage.join(root, name)
    if storage.is_remote(root):
        with tempfile.TemporaryDirectory(prefix="vlforge-ckpt-") as tmp:
            write(tmp)
            storage.remove(uri)
            storage.put_dir(tmp, uri)
    else:
        final = storage.filesystem(uri)[1]
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        write(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    entries = [e for e in _entries(root) if int(e["step"]) != step]
    entries.append({"dir": name, "step": step, "metrics": _plain(metrics)})
    entries.sort(key=lambda e: int(e["step"]))
    storage.write_json_atomic(storage.join(root, MANIFEST), {"checkpoints": entries[-KEEP:]})
    for old in entries[:-KEEP]:
        storage.remove(storage.join(root, old["dir"]))
    return Saved(uri, step)


def latest(root: str) -> Saved | None:
    """The newest checkpoint of the run folder ``root`` by step: ours or Ray Train's; None before the first."""
    ours = [Saved(storage.join(root, e["dir"]), int(e["step"])) for e in _entries(root)]
    ray = _ray_latest(root)
    return max(ours + ([ray] if ray else []), key=lambda s: s.step, default=None)


def _entries(root: str) -> list[dict]:
    uri = storage.join(root, MANIFEST)
    return list(storage.read_json(uri).get("checkpoints", [])) if storage.exists(uri) else []


def _ray_latest(root: str) -> Saved | None:
    """The latest checkpoint Ray Train registered in ``root``, with the step our loop reported with it."""
    uri = storage.join(root, RAY_SNAPSHOT)
    if not storage.exists(uri):
        return None
    try:
        result = storage.read_json(uri).get("latest_checkpoint_result") or {}
        return Saved(storage.join(root, result["checkpoint_dir_name"]), int(result["metrics"]["step"]))
    except (KeyError, TypeError, ValueError):  # no checkpoint yet, or a layout of another Ray version
        return None


def _plain(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
