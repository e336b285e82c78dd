"""CLIP scoring of raw shards on Ray Data, with a per-shard score cache.

Pipeline (streaming, so decoding overlaps inference):
``read_parquet`` -> ``repartition`` into batch-sized blocks -> ``map_batches(preprocess_batch)`` (torch-free
tasks: decode, resize, centre-crop to uint8) -> ``map_batches(ClipScorer)`` (an actor pool holding the model,
sized by :func:`scorer_plan`: one actor per GPU, else one single-threaded actor per core; it normalises the
pixels and embeds) -> the driver groups results by shard and writes

    scores/<source>/<scorer-key>/<batch>/<shard>.parquet   (key, clip_score, decode_ok, img_emb, text_emb)

as soon as a shard is complete. A re-run skips shards whose cache file exists, so new raw batches are scored
incrementally and an interrupted run resumes. Embeddings are L2-normalised float32 [D] lists.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.curate.shards import SCORER_KEY_META, read_parquet
from vlforge import defaults, raw, storage
from vlforge.settings import Settings


@dataclass(frozen=True)
class ScorerInfo:
    uri: str
    name: str
    version: str | None
    key: str  # cache key: changes whenever the weights do

    def as_dict(self) -> dict:
        return {"uri": self.uri, "name": self.name, "version": self.version, "key": self.key}


@dataclass(frozen=True)
class Shard:
    batch: str
    uri: str  # raw parquet shard
    cache_uri: str  # its score cache file
    rows: int  # rows with status == success


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "model"


def _dir_digest(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:12]


def scorer_identity(uri: str, settings: Settings) -> ScorerInfo:
    """Name, registry version and cache key of a scorer (``models:/...``, local folder or HF id)."""
    from vlforge.registry import registered_version, resolve_model_dir

    mv = registered_version(uri, settings)
    if mv is not None:
        return ScorerInfo(uri, mv.name, str(mv.version), _slug(f"{mv.name}-v{mv.version}"))
    model_dir = resolve_model_dir(uri, settings)
    if os.path.isdir(model_dir):
        name = os.path.basename(os.path.normpath(model_dir))
        return ScorerInfo(uri, name, None, f"{_slug(name)}-{_dir_digest(model_dir)}")
    return ScorerInfo(uri, uri, None, _slug(uri))


def cache_uri(settings: Settings, source: str, scorer_key: str, batch: str, shard_uri: str) -> str:
    name = os.path.basename(shard_uri)
    return storage.join(settings.storage_uri, "scores", source, scorer_key, batch, name)


def list_shards(settings: Settings, source: str, batches: list[str], scorer_key: str) -> list[Shard]:
    out = []
    for b in batches:
        for s in raw.shard_files(raw.batch_uri(settings, source, b)):
            status = read_parquet(s, ["status"]).column("status").to_pylist()
            rows = sum(1 for x in status if x == "success")
            out.append(Shard(b, s, cache_uri(settings, source, scorer_key, b, s), rows))
    return out


def preprocess_batch(batch: dict, image_size: int) -> dict:
    """Decode, resize and centre-crop one batch of raw rows (Ray Data task): drops non-success rows.

    Pixels stay uint8 [B, S, S, 3] (a quarter of float32 in the object store); the scorer normalises them.
    Torch-free, so these tasks start without importing torch or transformers.
    """
    from models.imageproc import resize_center_crop

    ok_rows = np.flatnonzero(np.asarray(batch["status"]) == "success")
    pixels = np.zeros((len(ok_rows), image_size, image_size, 3), dtype=np.uint8)
    decode_ok = np.ones(len(ok_rows), dtype=bool)
    for j, i in enumerate(ok_rows):
        try:
            pixels[j] = resize_center_crop(batch["jpg"][i], image_size)
        except Exception:  # corrupt bytes: scored as NaN, rejected as decode_failed
            decode_ok[j] = False
    return {
        "path": np.asarray(batch["path"])[ok_rows],
        "key": np.asarray(batch["key"])[ok_rows],
        "caption": np.asarray([c or "" for c in np.asarray(batch["caption"])[ok_rows]], dtype=object),
        "pixels": pixels,
        "decode_ok": decode_ok,
    }


class ClipScorer:
    """Ray Data actor holding one CLIP: image-text cosine + L2-normalised embeddings per row."""

    def __init__(self, uri: str, settings: Settings, num_threads: int | None = None):
        import torch

        from models.clip import fold_quick_gelu
        from tasks.common import load_model

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bundle = load_model(uri, settings, device=self.device)
        self.bundle.model.eval()
        fold_quick_gelu(self.bundle.model)  # same scores, fewer passes over memory; never saved from here

    def __call__(self, batch: dict) -> dict:
        import torch

        b = self.bundle
        with torch.inference_mode():
            pixels = b.normalize_pixels(torch.from_numpy(np.array(batch["pixels"])).to(self.device))
            tokens = {k: v.to(self.device) for k, v in b.tokenize(list(batch["caption"])).items()}
            img = b.embed_images(pixels).float()  # [B, D]
            txt = b.embed_texts(**tokens).float()  # [B, D]
            score = (img * txt).sum(-1)
        decode_ok = np.asarray(batch["decode_ok"], dtype=bool)
        score = score.cpu().numpy().astype(np.float32)
        score[~decode_ok] = np.nan
        return {
            "path": batch["path"],
            "key": batch["key"],
            "clip_score": score,
            "decode_ok": decode_ok,
            "img_emb": img.cpu().numpy(),
            "text_emb": txt.cpu().numpy(),
        }


def _emb_array(x: np.ndarray) -> pa.Array:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1] if x.ndim == 2 else 0)


def write_cache(uri: str, keys, clip_score, decode_ok, img_emb: np.ndarray, text_emb: np.ndarray) -> None:
    """Write one shard's score cache: key, clip_score, decode_ok and the L2-normalised embeddings [N, D]."""
    dim = img_emb.shape[1] if img_emb.ndim == 2 else 0
    table = pa.table(
        {
            "key": pa.array([str(k) for k in keys], pa.string()),
            "clip_score": pa.array(clip_score, pa.float32()),
            "decode_ok": pa.array(decode_ok, pa.bool_()),
            "img_emb": _emb_array(img_emb.reshape(len(img_emb), dim)),
            "text_emb": _emb_array(text_emb.reshape(len(text_emb), dim)),
        }
    )
    # The scorer's key (the cache folder: scores/<source>/<scorer-key>/<batch>/<shard>) travels in the file, so a
    # cache copied under another scorer's folder is refused at curation (tasks.curate.shards).
    table = table.replace_schema_metadata({SCORER_KEY_META: uri.rstrip("/").split("/")[-3]})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes_atomic(uri, buf.getvalue())


def _write_cache(uri: str, parts: list[dict], dim: int) -> None:
    cols = {
        k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0)
        for k in ("key", "clip_score", "decode_ok")
    }
    img = np.concatenate([p["img_emb"] for p in parts]) if parts else np.zeros((0, dim), np.float32)
    txt = np.concatenate([p["text_emb"] for p in parts]) if parts else np.zeros((0, dim), np.float32)
    write_cache(
        uri, cols["key"], cols["clip_score"], cols["decode_ok"], img.reshape(-1, dim), txt.reshape(-1, dim)
    )


def _strip_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else os.path.normpath(uri)


def build_dataset(
    shards: list[Shard],
    scorer_uri: str,
    settings: Settings,
    bundle,
    batch_size: int,
    num_scorers: int | None = None,
    num_threads: int | None = None,
):
    """The lazy Ray Dataset scoring ``shards``: preprocess tasks -> scorer actor pool."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI shows one bar of its own
    fs, _ = storage.filesystem(shards[0].uri)
    ds = ray.data.read_parquet(
        [_strip_scheme(s.uri) if storage.is_remote(s.uri) else s.uri for s in shards],
        filesystem=fs if storage.is_remote(shards[0].uri) else None,
        columns=["key", "caption", "jpg", "status"],
        include_paths=True,
    )
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    plan = scorer_plan(num_scorers, num_threads)
    ds = ds.map_batches(
        preprocess_batch,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"image_size": bundle.image_size},
        # Light tasks with their own (small) resources: Ray Data then does not fuse them into the scorer actor,
        # so decoding runs in parallel with (and ahead of) inference.
        num_cpus=plan.decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=plan.decode_tasks) if plan.decode_tasks else None,
    )
    return ds.map_batches(
        ClipScorer,
        batch_size=batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={"uri": scorer_uri, "settings": settings, "num_threads": plan.threads},
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=plan.gpus_per_actor,
        num_cpus=plan.cpus_per_actor,
    )


MAX_CPU_SCORERS = 16


@dataclass(frozen=True)
class ScorerPlan:
    actors: int
    threads: int | None  # torch intra-op threads per actor (None: torch's default)
    cpus_per_actor: float  # Ray logical CPUs
    gpus_per_actor: int
    decode_cpus: float  # Ray logical CPUs per decode task
    decode_tasks: int | None  # at most this many decode tasks at once (None: as resources allow)


def scorer_plan(num_scorers: int | None = None, num_threads: int | None = None) -> ScorerPlan:
    """How many scorer actors, and their resources, for the connected cluster.

    GPUs: one actor per GPU. CPUs only: one single-threaded actor per core (up to ``MAX_CPU_SCORERS``, then
    the cores are shared out as threads): independent single-threaded forward passes keep every core busy
    with no intra-op synchronisation, where one multi-threaded model stalls on each barrier whenever a decode
    task takes a core. Actors never ask for a GPU the cluster lacks (they would pend forever) and always leave
    logical CPUs free for the decode tasks.
    """
    from vlforge.raycluster import cluster_cpus, cluster_gpus, cluster_logical_cpus

    gpus = cluster_gpus()
    logical = cluster_logical_cpus()
    if gpus > 0:
        actors = num_scorers or gpus
        # A GPU scores far faster than one core decodes: let decode tasks use every free CPU.
        return ScorerPlan(actors, num_threads, min(1.0, logical / (2 * actors)), 1, 0.25, None)
    cores = cluster_cpus()
    actors = num_scorers or max(1, min(cores, MAX_CPU_SCORERS))
    threads = num_threads or max(1, cores // actors)
    # Logical CPUs: the actors' threads, but never so many that no decode task can be scheduled.
    per_actor = min(float(threads), max(0.1, (logical - 0.5) / actors))
    # Decoding a pair costs ~1/30 of a single-threaded ViT-B/32 forward pass: one decode task keeps about
    # four CPU actors fed with room to spare, and more would only take cores from them.
    return ScorerPlan(actors, threads, per_actor, 0, 0.25, max(1, actors // 4))


class _NoProgress:
    def advance(self, n: float = 1) -> None:
        pass


def progress_line(total: int, unit: str, description: str, progress: bool | None):
    """The console's progress line (``vlforge.console``: nothing outside a command), or none when ``progress``
    is False."""
    import contextlib

    from vlforge import console

    if progress is False:
        return contextlib.nullcontext(_NoProgress())
    return console.progress(total=total, unit=unit, description=description)


def score_shards(
    shards: list[Shard],
    scorer_uri: str,
    settings: Settings,
    bundle,
    batch_size: int = defaults.SCORING_BATCH,
    num_scorers: int | None = None,
    num_threads: int | None = None,
    progress: bool | None = None,
    timings: dict | None = None,
) -> int:
    """Score ``shards`` on Ray and write each one's cache file when complete; returns rows scored.

    ``timings``, when given, receives ``first_batch_at``/``last_batch_at`` (perf_counter) and
    ``first_batch_rows``, so callers can tell actor start-up from steady-state throughput.
    """
    import time

    from vlforge.raycluster import init_ray

    dim = int(bundle.model.config.projection_dim)
    for s in [s for s in shards if s.rows == 0]:
        _write_cache(s.cache_uri, [], dim)
    todo = {_strip_scheme(s.uri): s for s in shards if s.rows > 0}
    if not todo:
        return 0
    init_ray(settings)
    ds = build_dataset(
        list(todo.values()), scorer_uri, settings, bundle, batch_size, num_scorers, num_threads
    )
    parts: dict[str, list[dict]] = defaultdict(list)
    done: dict[str, int] = defaultdict(int)
    total = sum(s.rows for s in todo.values())
    with progress_line(total, "pairs", "scoring", progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            paths = np.asarray(batch["path"])
            for p in np.unique(paths):
                sel = paths == p
                key = _strip_scheme(str(p))
                parts[key].append({k: np.asarray(v)[sel] for k, v in batch.items()})
                done[key] += int(sel.sum())
                if done[key] == todo[key].rows:
                    _write_cache(todo[key].cache_uri, parts.pop(key), dim)
            bar.advance(len(paths))
            if timings is not None:
                timings.setdefault("first_batch_at", time.perf_counter())
                timings.setdefault("first_batch_rows", len(paths))
                timings["last_batch_at"] = time.perf_counter()
    return total
