"""Caption generation: a VLM in a Ray Data actor pool, and the plain single-process loop it is measured against.

``build_dataset`` reads the pending data parts of a dataset version (``key`` and ``image`` only, with each row's
file path) and maps them through :class:`Captioner`, a callable class in ``map_batches`` with an actor pool:
each actor loads the VLM once (on its GPU when the cluster has one) and writes one caption per row with greedy
decoding, one padded-left ``generate`` per batch (``models.vlm_eval.generate``). The order of rows is preserved,
so the driver can put each part's captions back beside its rows (``tasks.recaption.stage``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from vlforge.settings import Settings

DEFAULT_PROMPT = "Describe the image."
DEFAULT_MAX_NEW_TOKENS = 24
DEFAULT_BATCH_SIZE = 16
CAPTION_COLUMN = "caption_synthetic"
# Rows per actor call: the actor still generates in batches of ``batch_size``, but Ray Data's per-call cost
# (moving the batch in and the captions out through the object store) is paid once per this many rows.
ROWS_PER_CALL = 1024


def decode_images(values) -> tuple[list, np.ndarray]:
    """PIL images of ``values`` (encoded bytes or ``datasets``' Image structs) and a mask of the decodable
    ones: an image PIL cannot read gets no caption (null), never a failed batch."""
    from PIL import Image

    from vlforge.hfformat import encoded_image

    images, ok = [], np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        try:
            data = encoded_image(value)
            img = Image.open(io.BytesIO(data))
            img.load()
            images.append(img.convert("RGB"))
            ok[i] = True
        except Exception:  # corrupt or missing bytes: counted as undecodable
            continue
    return images, ok


def caption_images(bundle, images: list, prompt: str, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy captions of ``images`` in batches of ``batch_size`` (padding left, one ``generate`` per batch)."""
    from models.vlm_eval import generate

    if not images:
        return []
    return generate(bundle, images, [prompt] * len(images), max_new_tokens, batch_size=batch_size)


def load_captioner(model_dir: str, device: str = "cpu"):
    """The VLM bundle (model + processor) from a local ``save_pretrained`` folder, in eval mode."""
    from models.vlm import load_vlm

    return load_vlm(model_dir, device=device)


class Captioner:
    """Ray Data actor holding one VLM, loaded once: a caption per row (null for an image that cannot be
    decoded). The model is resolved from its URI in the actor, as curate's scorer is (a cluster node reads it
    from the registry or shared storage)."""

    def __init__(
        self,
        model_uri: str,
        settings: Settings,
        prompt: str,
        max_new_tokens: int,
        batch_size: int,
        num_threads: int | None = None,
    ):
        import torch

        from vlforge.registry import resolve_model_dir

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bundle = load_captioner(resolve_model_dir(model_uri, settings), self.device)
        self.prompt, self.max_new_tokens, self.batch_size = prompt, max_new_tokens, batch_size

    def __call__(self, batch: dict) -> dict:
        images, ok = decode_images(list(batch["image"]))
        texts = caption_images(self.bundle, images, self.prompt, self.max_new_tokens, self.batch_size)
        captions = np.full(len(ok), None, dtype=object)
        captions[np.flatnonzero(ok)] = texts
        return {"path": batch["path"], "key": batch["key"], CAPTION_COLUMN: captions}


@dataclass(frozen=True)
class CaptionerPlan:
    actors: int
    threads: int | None  # torch intra-op threads per actor (None: torch's default)
    cpus_per_actor: float
    gpus_per_actor: int


def captioner_plan(num_captioners: int | None = None) -> CaptionerPlan:
    """Actors for the connected cluster: one per GPU; on CPUs one actor using every core (autoregressive
    decoding of a small model is a chain of small matmuls: one process with all cores keeps pace with a plain
    loop, where several single-threaded actors would each hold a model copy for little gain on few cores)."""
    from vlforge.raycluster import cluster_cpus, cluster_gpus, cluster_logical_cpus

    gpus = cluster_gpus()
    logical = cluster_logical_cpus()
    if gpus > 0:
        actors = num_captioners or gpus
        return CaptionerPlan(actors, None, min(1.0, logical / (2 * actors)), 1)
    actors = num_captioners or 1
    threads = max(1, cluster_cpus() // actors)
    return CaptionerPlan(actors, threads, min(float(threads), max(0.1, (logical - 0.5) / actors)), 0)


def _strip_scheme(uri: str) -> str:
    import os

    return uri.split("://", 1)[1] if "://" in uri else os.path.normpath(uri)


def build_dataset(
    files: list[str],
    model_uri: str,
    settings: Settings,
    *,
    prompt: str,
    max_new_tokens: int,
    batch_size: int,
    num_captioners: int | None = None,
):
    """The lazy Ray Dataset captioning ``files`` (data parts): rows ``path``, ``key``, ``caption_synthetic``,
    in the files' row order."""
    import ray.data

    from vlforge import storage

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI shows one bar of its own
    remote = storage.is_remote(files[0])
    ds = ray.data.read_parquet(
        [_strip_scheme(f) for f in files] if remote else files,
        filesystem=storage.filesystem(files[0])[0] if remote else None,
        columns=["key", "image"],
        include_paths=True,
    )
    # Rows leave in the order they were read, so each part's captions line up with its rows.
    ds.context.execution_options.preserve_order = True
    plan = captioner_plan(num_captioners)
    return ds.map_batches(
        Captioner,
        batch_size=max(batch_size, ROWS_PER_CALL),
        batch_format="numpy",
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "settings": settings,
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "num_threads": plan.threads,
        },
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=plan.gpus_per_actor,
        num_cpus=plan.cpus_per_actor,
    )


def plain_loop(files: list[str], model_dir: str, *, prompt: str, max_new_tokens: int, batch_size: int) -> int:
    """The baseline ``bench/recaption.py`` compares with: one process reads each part and captions it with the
    same model and batch size (no Ray); returns the rows captioned."""
    import torch

    from tasks.curate.shards import read_parquet

    bundle = load_captioner(model_dir, "cuda" if torch.cuda.is_available() else "cpu")
    rows = 0
    for f in files:
        table = read_parquet(f, ["image"], what="data part")
        for start in range(0, table.num_rows, batch_size):
            images, _ = decode_images(table.column("image").slice(start, batch_size).to_pylist())
            rows += len(caption_images(bundle, images, prompt, max_new_tokens, batch_size))
    return rows
