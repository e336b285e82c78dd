"""Synthetic pairs written in the real on-disk formats: a published dataset version (DESIGN's data contract) and a
raw batch in img2dataset's layout, for the benchmarks and tests that need a stage's input without running the
stages before it."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlforge import storage
from vlforge.datasets import DatasetVersion, VersionWriter
from vlforge.demo.synth import SynthPair, make_instructions, make_pairs
from vlforge.hfformat import image_struct, with_hf_features
from vlforge.settings import Settings


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def publish_synthetic_dataset(
    settings: Settings,
    name: str = "synth",
    n: int = 64,
    mismatch_fraction: float = 0.0,
    seed: int = 0,
    labels: bool = False,
    prefix: str = "img",
) -> tuple[DatasetVersion, list[SynthPair]]:
    """Publish a dataset version in DESIGN's data contract from synthetic pairs (``image`` in ``datasets``'
    Image layout, as curate publishes it; ``labels``: with a ``label`` column naming each image's true class,
    "red circle", as a labelled eval set has)."""
    pairs = make_pairs(n, mismatch_fraction, seed=seed, prefix=prefix)
    return publish_pairs(settings, name, pairs, labels=labels), pairs


def publish_pairs(
    settings: Settings, name: str, pairs, labels: bool = False, files: int = 1, manifest: dict | None = None
) -> DatasetVersion:
    """Publish pairs (anything with ``key``, ``image``, ``caption`` and ``matched``; ``colour`` and ``shape`` with
    ``labels``) as a dataset version of ``files`` data files; ``manifest``: more manifest fields."""
    n = len(pairs)
    sizes = [image_size(p.image) for p in pairs]
    images = pa.array([p.image for p in pairs], pa.binary())
    table = pa.table(
        {
            "key": [p.key for p in pairs],
            "url": [f"http://127.0.0.1/img/{p.key}.jpg" for p in pairs],
            "caption": [p.caption for p in pairs],
            "image": image_struct(images),
            "width": [s[0] for s in sizes],
            "height": [s[1] for s in sizes],
            "sha256": [hashlib.sha256(p.image).hexdigest() for p in pairs],
            "clip_score": [1.0] * n,
            "source": ["synthetic"] * n,
            "raw_batch": ["synthetic-batch"] * n,
            "truth_matched": [int(p.matched) for p in pairs],
            **({"label": [f"{p.colour} {p.shape}" for p in pairs]} if labels else {}),
        }
    )
    writer = VersionWriter(settings, name)
    per_file = -(-n // files)
    for i in range(files):
        writer.write_table("data", with_hf_features(table.slice(i * per_file, per_file)), index=i)
    meta = {"counts": {"kept": n, "rejected": 0}, "source": "synthetic", "filters": {}, **(manifest or {})}
    return writer.publish(meta)


def write_raw_batch(
    settings: Settings, source: str, batch_id: str, pairs: list[SynthPair], shard_size: int = 50
):
    """A raw batch in img2dataset's parquet layout (as ``tasks.ingest`` writes it), with ``_SUCCESS``."""
    uri = storage.join(settings.storage_uri, "raw", source, batch_id)
    for shard, start in enumerate(range(0, len(pairs), shard_size)):
        chunk = pairs[start : start + shard_size]
        sizes = [image_size(p.image) for p in chunk]
        table = pa.table(
            {
                "url": [f"http://127.0.0.1/img/{p.key}.jpg" for p in chunk],
                "caption": [p.caption for p in chunk],
                "key": [f"{shard:05d}{i:04d}" for i in range(len(chunk))],
                "status": ["success"] * len(chunk),
                "error_message": pa.array([None] * len(chunk), pa.string()),
                "width": pa.array([s[0] for s in sizes], pa.int32()),
                "height": pa.array([s[1] for s in sizes], pa.int32()),
                "original_width": pa.array([s[0] for s in sizes], pa.int32()),
                "original_height": pa.array([s[1] for s in sizes], pa.int32()),
                "exif": ["{}"] * len(chunk),
                "sha256": [hashlib.sha256(p.image).hexdigest() for p in chunk],
                "jpg": pa.array([p.image for p in chunk], pa.binary()),
                "truth_matched": [int(p.matched) for p in chunk],
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes_atomic(storage.join(uri, f"{shard:05d}.parquet"), buf.getvalue())
        storage.write_json_atomic(
            storage.join(uri, f"{shard:05d}_stats.json"), {"count": len(chunk), "successes": len(chunk)}
        )
    storage.write_text_atomic(storage.join(uri, "_SUCCESS"), "")
    return uri


def publish_instructions(
    settings: Settings, name: str, pairs, questions: tuple[tuple[str, str], ...], label: bool = True
) -> DatasetVersion:
    """Publish one row per (pair, question) with the columns a VLM fine-tune reads: ``prompt`` and
    ``response`` (``vlforge.demo.synth.make_instructions``) beside ``key``, ``image``, ``caption`` and, with
    ``label``, the pair's class ("red circle"); as carried from a URL list's extra columns."""
    rows = make_instructions(pairs, questions)
    per_pair = len(questions)
    owners = [pairs[i // per_pair] for i in range(len(rows))]
    table = pa.table(
        {
            "key": [f"{p.key}-q{i % per_pair}" for i, p in enumerate(owners)],
            "url": [f"http://127.0.0.1/img/{p.key}.jpg" for p in owners],
            "caption": [p.caption for p in owners],
            "image": image_struct(pa.array([r[0] for r in rows], pa.binary())),
            **({"label": [f"{p.colour} {p.shape}" for p in owners]} if label else {}),
            "prompt": [r[1] for r in rows],
            "response": [r[2] for r in rows],
        }
    )
    writer = VersionWriter(settings, name)
    writer.write_table("data", with_hf_features(table))
    return writer.publish(
        {"counts": {"kept": len(rows), "rejected": 0}, "source": "synthetic", "filters": {}}
    )
