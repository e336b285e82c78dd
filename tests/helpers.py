"""Test helpers: Ray process watching and LoRA with live adapters. The synthetic-data builders live in the product
(``vlforge.demo.datasets``) and are re-exported here for the tests."""

from __future__ import annotations

from vlforge.demo.datasets import (  # noqa: F401 (re-exported for the tests)
    image_size,
    publish_instructions,
    publish_pairs,
    publish_synthetic_dataset,
    write_raw_batch,
)


def ray_processes() -> set[tuple[str, str]]:
    """(pid, actor or task name) of every Ray worker process on this machine now, from its process title
    (``ray::SplitCoordinator``, ``ray::RayTrainWorker.run``, ...). Linux only (reads /proc)."""
    import os

    found = set()
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError):
            continue  # not a process, or it exited
        name = cmd[len("ray::") :].split(".")[0].strip() if cmd.startswith("ray::") else ""
        if name:
            found.add((pid, name.split()[0]))
    return found


class RayProcessWatcher:
    """Records the Ray worker processes that appear while the ``with`` block runs (``ray_processes``): which
    actors a run really started. A process that already had its title before the block does not count: an
    earlier training's actors take a few seconds to exit."""

    def __init__(self, interval_s: float = 0.2):
        import threading

        self.interval_s = interval_s
        self.seen: set[str] = set()
        self._before: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.seen |= {name for _, name in ray_processes() - self._before}
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RayProcessWatcher:
        self._before = ray_processes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def lora_with_live_adapters(bundle, pairs):
    """LoRA (r 4, alpha 8) on ``bundle.model`` with non-zero adapters, so merging has something to fold in.
    Returns (the peft model in eval mode, the model inputs of ``pairs``, its outputs on them)."""
    import torch

    from models.lora import LoraArgs, apply_lora

    peft_model = apply_lora(bundle.model, LoraArgs(r=4, alpha=8))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    inputs = dict(
        pixel_values=bundle.preprocess_images([p.image for p in pairs]),
        **bundle.tokenize([p.caption for p in pairs]),
    )
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(**inputs)
    return peft_model, inputs, before
