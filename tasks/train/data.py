"""Training data of a dataset version: held-out split, decoding, augmentation, tokenisation; as a Ray Dataset
for Ray Train workers, or decoded in the process of a one-worker training in the driver (:class:`TensorPipeline`).

The train loop only sees tensors: ``pixel_values`` [B, 3, S, S] float32, ``input_ids`` and
``attention_mask`` [B, L] int64. The held-out split is decided by the image's content: a deterministic hash
of the top bits of its perceptual hash (``vlforge.imagehash.split_hash``; the ``phash`` column curate writes,
computed from the image bytes for versions published before it), so every process (driver, Ray Data tasks, a
resumed run) agrees on it without coordination, and the same image, or a re-encoded copy of it, falls on the
same side in every version, batch and source (:data:`SPLIT_RULE`; the row ``key``, img2dataset's shard-and-row
position, repeats across batches and decided it before). A pair is held out when that hash, read as a number
in [0, 1), is below the split's threshold. :func:`heldout_fraction` chooses that
threshold once per dataset version so that the split is large enough to measure (at least
``min_eval_pairs`` pairs, or the configured fraction, whichever is larger); :func:`heldout_ref` names the split
(``NAME@VERSION#heldoutF``) and :func:`read_eval_data` reads any such name back.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlforge import defaults, storage
from vlforge.datasets import DatasetVersion
from vlforge.hfformat import encoded_image, encoded_images
from vlforge.imagehash import SPLIT_RULE as _PHASH_RULE
from vlforge.imagehash import phash_bytes, split_hash

TRAIN_COLUMNS = ["key", "caption", "image"]
PHASH = "phash"  # curate's content-hash column (vlforge.imagehash.phash_of)
SPLIT_RULE = f"content:{_PHASH_RULE}"  # recorded with every training run's params
DEFAULT_MIN_EVAL_PAIRS = (
    defaults.MIN_EVAL_PAIRS
)  # a recall or accuracy on fewer pairs cannot tell models apart
DEFAULT_MAX_EVAL_PAIRS = defaults.MAX_EVAL_PAIRS  # a web-scale fraction would hold out millions
MAX_EVAL_SHARE = 0.5  # the minimum never holds out more than half of a small dataset: the rest trains
MATERIALIZE_BYTES = 4 * 2**30  # training tensors kept in Ray's object store across epochs, at most
IN_PROCESS_BYTES = 2**30  # tensors a training in the driver decodes and keeps in its own process, at most
DECODE_BATCH = 64  # rows decoded and tokenised at a time
AUGMENT_BATCH = 256  # rows shuffled and flipped together (augment_batch)
TOKENIZER_SAMPLE = 1_000_000  # captions a new tokenizer is fitted on, at most
LOCAL_FILES = 8  # a version with more data files computes its split file by file on Ray
HELDOUT = "#heldout"


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big")


def is_eval_key(key: str, eval_fraction: float) -> bool:
    """True when ``key`` belongs to the held-out split (stable across processes and runs)."""
    if eval_fraction <= 0:
        return False
    return _key_hash(key) / 2**32 < eval_fraction


def eval_mask(keys: Sequence[str], eval_fraction: float) -> np.ndarray:
    return np.fromiter((is_eval_key(str(k), eval_fraction) for k in keys), dtype=bool, count=len(keys))


def _phash_value(v) -> int | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return int(v)


def content_hashes(rows) -> np.ndarray:
    """int64 [N] split hashes of rows (a pyarrow Table or a Ray Data numpy batch): from the ``phash`` column
    when the rows have one, else computed from the image bytes (a version published before curate wrote it);
    a row without an image or phash falls back to its key."""
    get = (lambda c: rows.column(c).to_pylist()) if isinstance(rows, pa.Table) else (lambda c: list(rows[c]))
    names = rows.column_names if isinstance(rows, pa.Table) else list(rows)
    keys = [str(k) for k in get("key")] if "key" in names else [""] * _num_rows(rows)
    if PHASH in names:
        phashes = [_phash_value(v) for v in get(PHASH)]
    elif isinstance(rows, pa.Table):
        phashes = [
            None if b is None else phash_bytes(b) for b in encoded_images(rows.column("image")).to_pylist()
        ]
    else:
        phashes = [None if b is None else phash_bytes(encoded_image(b)) for b in rows["image"]]
    return np.fromiter((split_hash(h, k) for h, k in zip(phashes, keys, strict=True)), np.int64, len(keys))


def _num_rows(rows) -> int:
    return rows.num_rows if isinstance(rows, pa.Table) else len(next(iter(rows.values())))


def content_eval_mask(rows, eval_fraction: float) -> np.ndarray:
    """True for the rows (a Table or a numpy batch) in the held-out split at ``eval_fraction``."""
    if eval_fraction <= 0:
        return np.zeros(_num_rows(rows), dtype=bool)
    return content_hashes(rows) / 2**32 < eval_fraction


def split_columns(dv: DatasetVersion) -> list[str]:
    """The columns the split reads: ``phash`` when the version has it, else the image (hashed on the fly)."""
    schema = (dv.manifest.get("schema") or {}).get("data") or {}
    return ["key", PHASH] if PHASH in schema or _file_has_phash(dv) else ["key", "image"]


def _file_has_phash(dv: DatasetVersion) -> bool:
    files = dv.part_files("data")
    if not files:
        return False
    fs, local = storage.filesystem(files[0])
    with fs.open(local, "rb") as fh:
        return PHASH in pq.read_schema(fh).names


def heldout_fraction(
    keys: Sequence[str],
    eval_fraction: float,
    min_eval_pairs: int = DEFAULT_MIN_EVAL_PAIRS,
    max_eval_pairs: int = DEFAULT_MAX_EVAL_PAIRS,
) -> float:
    """The split threshold for these keys: ``eval_fraction``, raised when that holds out fewer than
    ``min(min_eval_pairs, MAX_EVAL_SHARE * len(keys))`` pairs to the least value that holds out that many, and
    lowered when it holds out more than ``max_eval_pairs`` (0: no cap) to the value that holds out that many.

    Deterministic for a set of keys (a dataset version), and exact: a moved threshold is the k-th smallest
    key hash plus one, over 2**32, which a float64 holds exactly. Pass the result wherever a split's
    ``eval_fraction`` goes (``read_split``, ``train_dataset``, ``count_train_rows``)."""
    return heldout_fraction_of(_hashes(keys), eval_fraction, min_eval_pairs, max_eval_pairs)


def heldout_fraction_of(
    hashes: np.ndarray,
    eval_fraction: float,
    min_eval_pairs: int = DEFAULT_MIN_EVAL_PAIRS,
    max_eval_pairs: int = DEFAULT_MAX_EVAL_PAIRS,
) -> float:
    """:func:`heldout_fraction` over split hashes (:func:`content_hashes`) rather than keys."""
    return _threshold(_stats_of(hashes, eval_fraction, _keep(min_eval_pairs, max_eval_pairs)),
                      eval_fraction, min_eval_pairs, max_eval_pairs)  # fmt: skip


@dataclass(frozen=True)
class _SplitStats:
    """What choosing a split threshold needs of a set of keys: their number, how many hash below the configured
    fraction, and the smallest ``k`` hashes (sorted). Stats of parts merge into the stats of the whole."""

    rows: int
    below: int
    smallest: np.ndarray  # int64, sorted, at most k

    @staticmethod
    def merge(parts: Sequence[_SplitStats], k: int) -> _SplitStats:
        smallest = np.sort(np.concatenate([p.smallest for p in parts] or [np.zeros(0, np.int64)]))[:k]
        return _SplitStats(sum(p.rows for p in parts), sum(p.below for p in parts), smallest)


def _keep(min_eval_pairs: int, max_eval_pairs: int) -> int:
    return max(int(min_eval_pairs), int(max_eval_pairs or 0))


def _hashes(keys: Sequence[str]) -> np.ndarray:
    return np.fromiter((_key_hash(str(k)) for k in keys), dtype=np.int64, count=len(keys))


def _hash_stats(keys: Sequence[str], eval_fraction: float, k: int) -> _SplitStats:
    return _stats_of(_hashes(keys), eval_fraction, k)


def _stats_of(hashes: np.ndarray, eval_fraction: float, k: int) -> _SplitStats:
    below = int((hashes / 2**32 < eval_fraction).sum()) if eval_fraction > 0 else 0
    smallest = np.partition(hashes, k - 1)[:k] if 0 < k < len(hashes) else hashes
    return _SplitStats(len(hashes), below, np.sort(smallest))


def _threshold(stats: _SplitStats, eval_fraction: float, min_eval_pairs: int, max_eval_pairs: int) -> float:
    fraction = float(max(eval_fraction, 0.0))
    want = min(int(min_eval_pairs), int(MAX_EVAL_SHARE * stats.rows))
    if want > 0 and stats.below < want:
        return float(stats.smallest[want - 1] + 1) / 2**32
    cap = max(int(max_eval_pairs or 0), want)  # never below the minimum
    if max_eval_pairs and stats.below > cap:
        return float(stats.smallest[cap - 1] + 1) / 2**32
    return fraction


def read_data_file(path: str, columns: list[str]) -> pa.Table:
    """One data file's ``columns`` (local or remote)."""
    fs, local = storage.filesystem(path)
    with fs.open(local, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def _file_hashes(path: str, columns: list[str]) -> np.ndarray:
    return content_hashes(read_data_file(path, columns))


def _file_stats(path: str, eval_fraction: float, k: int, columns: list[str]) -> _SplitStats:
    return _stats_of(_file_hashes(path, columns), eval_fraction, k)


def _file_train_rows(path: str, threshold: float, columns: list[str]) -> int:
    hashes = _file_hashes(path, columns)
    return int((hashes / 2**32 >= threshold).sum()) if threshold > 0 else len(hashes)


def _per_file(dv: DatasetVersion, fn, *args) -> list:
    """``fn(file, *args)`` for each data file of the version: one Ray task per file when the version has more
    than ``LOCAL_FILES`` (the key column is read and hashed where the task runs; the driver gets a few numbers
    per file, never the keys), in this process otherwise."""
    files = dv.part_files("data")
    if len(files) <= LOCAL_FILES:
        return [fn(f, *args) for f in files]
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    return ray.get([remote.remote(f, *args) for f in files])


def dataset_split(
    dv: DatasetVersion,
    eval_fraction: float,
    min_eval_pairs: int = DEFAULT_MIN_EVAL_PAIRS,
    max_eval_pairs: int = DEFAULT_MAX_EVAL_PAIRS,
) -> tuple[float, int]:
    """``(threshold, train rows)`` of a dataset version: :func:`heldout_fraction` of its keys and the rows outside
    that split, from one pass over the key column, file by file (see :func:`_per_file`). A second pass
    (:func:`count_train_rows`) only when hashes tie at the edge of those kept."""
    k = _keep(min_eval_pairs, max_eval_pairs) + 1  # one more than a moved threshold needs: see _train_rows
    stats = _SplitStats.merge(_per_file(dv, _file_stats, eval_fraction, k, split_columns(dv)), k)
    threshold = _threshold(stats, eval_fraction, min_eval_pairs, max_eval_pairs)
    rows = _train_rows(stats, eval_fraction, threshold)
    return threshold, rows if rows is not None else count_train_rows(dv, threshold)


def dataset_heldout_fraction(
    dv: DatasetVersion,
    eval_fraction: float,
    min_eval_pairs: int = DEFAULT_MIN_EVAL_PAIRS,
    max_eval_pairs: int = DEFAULT_MAX_EVAL_PAIRS,
) -> float:
    """:func:`heldout_fraction` of a dataset version's keys (the threshold of :func:`dataset_split`)."""
    return dataset_split(dv, eval_fraction, min_eval_pairs, max_eval_pairs)[0]


def _train_rows(stats: _SplitStats, eval_fraction: float, threshold: float) -> int | None:
    """The rows whose key hashes at or above ``threshold``, from the stats alone; None when they cannot tell."""
    if threshold == float(max(eval_fraction, 0.0)):
        return stats.rows - stats.below
    cut = threshold * 2**32  # a moved threshold: a kept hash plus one, an exact integer
    if len(stats.smallest) == stats.rows or stats.smallest[-1] >= cut:  # every hash below the cut was kept
        return stats.rows - int((stats.smallest < cut).sum())
    return None


def heldout_ref(dv: DatasetVersion, fraction: float) -> str:
    """The name of a dataset version's held-out split at ``fraction`` (``NAME@VERSION#heldoutF``, F exact)."""
    return f"{dv.ref}{HELDOUT}{fraction!r}"


def read_eval_data(ref: str, settings) -> pa.Table:
    """The pairs (columns image, caption) an eval-data name stands for: ``NAME@VERSION#heldoutF`` is that
    version's held-out split at F (see :func:`heldout_ref`), ``NAME[@VERSION]`` the whole version."""
    from vlforge.datasets import resolve_dataset
    from vlforge.errors import VlforgeError

    dataset, _, fraction = ref.partition(HELDOUT)
    dv = resolve_dataset(settings, dataset)
    if not fraction:
        return dv.read_table("data", columns=["image", "caption"])
    try:
        threshold = float(fraction)
    except ValueError:
        raise VlforgeError(f"eval data {ref!r}: {fraction!r} after {HELDOUT!r} is not a fraction") from None
    return read_split(dv, threshold, "eval").select(["image", "caption"])


def train_captions(
    dv: DatasetVersion,
    eval_fraction: float,
    limit: int = TOKENIZER_SAMPLE,
    columns: Sequence[str] = ("caption",),
) -> list[str]:
    """The first ``limit`` non-empty texts of the train split's ``columns`` (row by row), read file by file
    without the images: what a new tokenizer is fitted on. A sample, as for any BPE: a web-scale version has
    hundreds of millions of captions."""
    out: list[str] = []
    for f in dv.part_files("data"):
        table = read_data_file(f, list(dict.fromkeys([*split_columns(dv), *columns])))
        keep = ~content_eval_mask(table, eval_fraction)
        texts = zip(*(table.column(c).to_pylist() for c in columns), strict=True)
        out += [str(v) for row, k in zip(texts, keep, strict=True) if k for v in row if v]
        if len(out) >= limit:
            return out[:limit]
    return out


def read_split(dv: DatasetVersion, eval_fraction: float, split: str) -> pa.Table:
    """The ``train`` or ``eval`` rows of a dataset version (columns key, caption, image, and phash when the
    version has it)."""
    table = dv.read_table("data", columns=train_columns(dv))
    mask = content_eval_mask(table, eval_fraction)
    return table.filter(pa.array(mask if split == "eval" else ~mask))


def local_dir(uri: str) -> str:
    """A local folder with the contents of ``uri`` (downloaded once per process when remote)."""
    if not storage.is_remote(uri):
        return storage.filesystem(uri)[1]
    return _download_dir(uri)


@functools.lru_cache(maxsize=8)
def _download_dir(uri: str) -> str:
    target = tempfile.mkdtemp(prefix="vlforge-model-")
    storage.get_dir(uri, target)
    return target


@functools.lru_cache(maxsize=4)
def _preprocessor(model_uri: str):
    """A weightless ClipBundle (tokenizer, image processor, config) for preprocessing in Ray Data tasks."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from models.clip import ClipBundle, _load_processor, load_clip_config

    path = local_dir(model_uri)
    holder = SimpleNamespace(config=load_clip_config(path))
    return ClipBundle(holder, AutoTokenizer.from_pretrained(path), _load_processor(path, holder))


def preprocess_batch(
    batch: dict[str, np.ndarray],
    *,
    model_uri: str,
    eval_fraction: float,
    caption_col: str = "caption",
    alt_col: str | None = None,
) -> dict[str, np.ndarray]:
    """Drop held-out rows, decode + normalise images, tokenise captions (of ``caption_col``; with ``alt_col``
    that column's too, as ``alt_input_ids``/``alt_attention_mask``, for :func:`augment_batch` to draw from)."""
    bundle = _preprocessor(model_uri)
    keep = ~content_eval_mask(batch, eval_fraction)
    images = [encoded_image(b) for b, k in zip(batch["image"], keep, strict=True) if k]
    captions = [str(c) for c, k in zip(batch[caption_col], keep, strict=True) if k]
    size = bundle.image_size
    if not images:
        empty_ids = np.zeros((0, bundle.max_length), dtype=np.int64)
        alt_keys = [ALT + "input_ids", ALT + "attention_mask"] if alt_col is not None else []
        return {
            "pixel_values": np.zeros((0, 3, size, size), dtype=np.float32),
            "input_ids": empty_ids,
            "attention_mask": empty_ids.copy(),
            **{k: empty_ids.copy() for k in alt_keys},
        }
    pixels = bundle.preprocess_images(images).numpy()  # [B, 3, S, S]
    tokens = bundle.tokenize(captions, fixed_length=True)
    out = {
        "pixel_values": np.ascontiguousarray(pixels, dtype=np.float32),
        "input_ids": tokens["input_ids"].numpy().astype(np.int64),
        "attention_mask": tokens["attention_mask"].numpy().astype(np.int64),
    }
    if alt_col is not None:
        # A row without an alternative caption (an image the captioner could not decode) keeps its own.
        alts = [
            str(a if a is not None else c)
            for a, c, k in zip(batch[alt_col], batch[caption_col], keep, strict=True)
            if k
        ]
        alt = bundle.tokenize(alts, fixed_length=True)
        out[ALT + "input_ids"] = alt["input_ids"].numpy().astype(np.int64)
        out[ALT + "attention_mask"] = alt["attention_mask"].numpy().astype(np.int64)
    return out


def version_rows(dv: DatasetVersion) -> int:
    """A version's data rows, from the parquet footers only."""
    rows = 0
    for f in dv.part_files("data"):
        fs, local = storage.filesystem(f)
        with fs.open(local, "rb") as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    return rows


def materialize_within_budget(ds, dv: DatasetVersion, row_bytes: int):
    """``ds`` materialised when a version of ``row_bytes`` a row fits :data:`MATERIALIZE_BYTES`, else ``ds`` as a
    stream (decoded again every epoch): a web-scale version's pixels do not fit any object store."""
    return ds.materialize() if version_rows(dv) * row_bytes <= MATERIALIZE_BYTES else ds


def clip_row_bytes(model_uri: str) -> int:
    """The size of one CLIP training row's tensors (pixels, token ids and mask)."""
    bundle = _preprocessor(model_uri)
    return 3 * bundle.image_size**2 * 4 + 2 * bundle.max_length * 8


def train_dataset(
    dv: DatasetVersion,
    model_uri: str,
    *,
    eval_fraction: float,
    augment: bool = True,
    seed: int = 0,
    captions: CaptionPlan | None = None,
) -> TensorPipeline:
    """The CLIP training tensors of the dataset version's parquet parts (pixels and caption tokens);
    ``captions``: which caption column(s) it trains on (default: ``caption``)."""
    plan = captions or CaptionPlan()
    kwargs = {"model_uri": model_uri, "eval_fraction": eval_fraction, "caption_col": plan.column,
              "alt_col": plan.alt_column}  # fmt: skip
    row_bytes = clip_row_bytes(model_uri) * (2 if plan.alt_column else 1)  # an upper bound with alt tokens
    return tensor_dataset(
        dv, train_columns(dv, ["key", *plan.columns, "image"]), preprocess_batch, kwargs, row_bytes, seed=seed,
        flip=augment, alt_prob=plan.alt_prob,
    )  # fmt: skip


ALT = "alt_"  # prefix of the alternative caption's token columns (dropped by augment_batch after its draw)
SYNTHETIC_CAPTION = "caption_synthetic"  # what `vlforge recaption` writes


@dataclass(frozen=True)
class CaptionPlan:
    """The caption a CLIP trains on: ``column``, or (``alt_column`` set) each sample in each epoch draws
    ``alt_column`` with probability ``alt_prob``, else ``column``."""

    column: str = "caption"
    alt_column: str | None = None
    alt_prob: float = 0.0

    @classmethod
    def of(cls, caption_col: str = "caption", caption_mix: float | None = None) -> CaptionPlan:
        """``--caption-col C``: train on C. ``--caption-mix P``: draw the synthetic caption (C when C is not
        ``caption``, else ``caption_synthetic``) with probability P, else the original ``caption``."""
        if caption_mix is None:
            return cls(caption_col)
        synthetic = caption_col if caption_col != "caption" else SYNTHETIC_CAPTION
        return cls("caption", synthetic, float(caption_mix))

    @property
    def columns(self) -> list[str]:
        return [self.column] + ([self.alt_column] if self.alt_column else [])

    def check(self, dv: DatasetVersion) -> None:
        """Each column exists in the version (its first data file's footer): one clear error otherwise."""
        from vlforge.errors import VlforgeError

        files = dv.part_files("data")
        if not files:
            raise VlforgeError(f"dataset {dv.ref} has no data files to train on")
        fs, path = storage.filesystem(files[0])
        with fs.open(path, "rb") as fh:
            present = pq.ParquetFile(fh).schema_arrow.names
        for column in self.columns:
            if column not in present:
                hint = " (write it with `vlforge recaption`)" if column == SYNTHETIC_CAPTION else ""
                raise VlforgeError(
                    f"dataset {dv.ref} has no caption column {column!r}{hint}; its columns: {', '.join(present)}"
                )


def tensor_dataset(
    dv: DatasetVersion,
    columns: list[str],
    preprocess,
    fn_kwargs: dict,
    row_bytes: int,
    *,
    seed: int,
    flip: bool,
    alt_prob: float = 0.0,
) -> TensorPipeline:
    """The training tensors of any recipe: ``columns`` of the version through ``preprocess`` (a batch function
    dropping held-out rows, ``fn_kwargs`` its settings; ``row_bytes`` the size of a row it makes), then a new
    order and random flips every epoch, drawn from ``seed`` (see :func:`augment_batch`). The driver runs it as a
    Ray Dataset (:meth:`TensorPipeline.ray_dataset`, for Ray Train workers) or in its own process
    (:meth:`TensorPipeline.in_process`, a one-worker training in the driver)."""
    return TensorPipeline(
        dv, list(columns), preprocess, dict(fn_kwargs), int(row_bytes), int(seed), bool(flip), float(alt_prob)
    )


@dataclass(frozen=True)
class TensorPipeline:
    """What a recipe's training tensors are made of (see :func:`tensor_dataset`), before the driver picks where
    they are made."""

    dv: DatasetVersion
    columns: list[str]
    preprocess: Callable[..., dict[str, np.ndarray]]
    fn_kwargs: dict
    row_bytes: int
    seed: int
    flip: bool
    alt_prob: float = (
        0.0  # --caption-mix: the chance a sample trains on its synthetic caption (augment_batch)
    )

    def fits_in_process(self) -> bool:
        """Whether the tensors are small enough to decode and keep in the training process (``IN_PROCESS_BYTES``):
        beyond that, Ray Data's parallel decoding and its object store are worth Ray's start-up."""
        return version_rows(self.dv) * self.row_bytes <= IN_PROCESS_BYTES

    def in_process(self) -> InProcessTensors:
        """Decoded here, block by block (the files' rows in order, ``DECODE_BATCH`` at a time), and kept."""
        return InProcessTensors(self.decoded_blocks(), seed=self.seed, flip=self.flip, alt_prob=self.alt_prob)

    def decoded_blocks(self) -> list[dict[str, np.ndarray]]:
        """The tensors decoded in this process: the files' rows in order, ``DECODE_BATCH`` at a time."""
        blocks = []
        for f in self.dv.part_files("data"):
            table = read_data_file(f, self.columns)
            for start in range(0, table.num_rows, DECODE_BATCH):
                batch = _numpy_batch(table.slice(start, DECODE_BATCH))
                block = self.preprocess(batch, **self.fn_kwargs)
                if len(next(iter(block.values()))):
                    blocks.append(block)
        return blocks

    def ray_dataset(self, driver_rows: int = 0):
        """A Ray Dataset of the tensors (what Ray Train workers read). A version of at most ``driver_rows`` rows
        (``Settings.driver_decode_rows``) is decoded here and handed over from memory: sooner, for a small one,
        than starting Ray Data's parquet readers and decode tasks that each import the model's code."""
        import ray.data
        from ray.data import RandomSeedConfig
        from ray.data.block import BlockAccessor

        if version_rows(self.dv) <= driver_rows and self.fits_in_process():
            # The blocks (in file and row order, as below) go to the object store from here: materialised.
            ds = ray.data.from_blocks([BlockAccessor.batch_to_block(b) for b in self.decoded_blocks()])
        else:
            ds = read_parquet_dataset(self.dv, self.columns)
            # Reproducible from ``seed``: blocks leave every operator in the order they entered it (files, then
            # rows), not in the order tasks finish, so each map batch below holds the same rows in every run.
            ds.context.execution_options.preserve_order = True
            ds = ds.map_batches(
                self.preprocess, batch_format="numpy", batch_size=DECODE_BATCH, fn_kwargs=self.fn_kwargs
            )
            # Decoding and tokenising once (not every epoch) matters on small machines; the random augmentation
            # below runs again on every epoch's pass over the materialised tensors. A version whose tensors would
            # not fit the budget (a web-scale one: 600 KB a row at 224 px) streams instead, decoded every epoch.
            ds = materialize_within_budget(ds, self.dv, self.row_bytes)
        # Per-epoch shuffling here rather than iter_torch_batches' local shuffle buffer, which re-concatenates
        # tensor columns on the training process for every batch (a copy of every batch, on the training's cores).
        # The block order is drawn from the seed and Ray Data's execution index of this dataset (one execution per
        # epoch): a new order every epoch, the same orders in every run with the same seed.
        ds = ds.randomize_block_order(
            seed=RandomSeedConfig(seed=_seed32(self.seed), reseed_after_execution=True)
        )
        ds = ds.map_batches(
            augment_batch, batch_format="numpy", batch_size=AUGMENT_BATCH,
            fn_kwargs={"seed": self.seed, "flip": self.flip, **({"alt_prob": self.alt_prob} if self.alt_prob else {})},
        )  # fmt: skip
        # No Ray Data progress bars for the per-epoch passes: the training reports its own progress, and a worker
        # redrawing bars every epoch only fills the log (the decode pass above has shown its bar already). This
        # context belongs to the dataset (and its materialised parent), not to the driver: its DataContext keeps
        # bars.
        ds.context.enable_progress_bars = False
        ds.context.execution_options.preserve_order = True  # the per-epoch passes too (see above)
        return ds


def _numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A table's columns as Ray Data's ``batch_format="numpy"`` hands them to a batch function (structs as
    dicts, strings as objects)."""
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


class InProcessTensors:
    """Training tensors kept in the training process, iterated as the loop iterates a Ray Train dataset shard
    (``iter_torch_batches``). As in :meth:`TensorPipeline.ray_dataset`, every pass is an epoch with a new block
    order and new flips, drawn from the seed and the pass's index (the first pass of this process is 0)."""

    def __init__(self, blocks: list[dict[str, np.ndarray]], *, seed: int, flip: bool, alt_prob: float = 0.0):
        self.columns = {k: np.concatenate([b[k] for b in blocks]) for k in (blocks[0] if blocks else {})}
        self.bounds = np.cumsum([0] + [len(next(iter(b.values()))) for b in blocks])
        self.seed, self.flip, self.alt_prob, self.passes = seed, flip, alt_prob, 0

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """int64 [N] row indices of an epoch: whole blocks in an order drawn from the seed and the epoch."""
        order = np.random.default_rng([_seed32(self.seed), int(epoch)]).permutation(len(self.bounds) - 1)
        parts = [np.arange(self.bounds[b], self.bounds[b + 1]) for b in order]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = True, device=None, prefetch_batches=0):
        """Batches of torch tensors on ``device`` (``prefetch_batches`` is Ray's knob; the tensors are here)."""
        import torch

        epoch, self.passes = self.passes, self.passes + 1
        rows, pending = self.epoch_rows(epoch), []
        for start in range(0, len(rows), AUGMENT_BATCH):
            chunk = {k: v[rows[start : start + AUGMENT_BATCH]] for k, v in self.columns.items()}
            pending.append(
                augment_batch(chunk, seed=self.seed, flip=self.flip, epoch=epoch, alt_prob=self.alt_prob)
            )
            # augment_batch's columns: a --caption-mix batch's synthetic tokens have replaced the original's
            merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[-1]}
            n, used = len(merged[next(iter(merged))]), 0
            while n - used >= batch_size:
                yield {k: torch.from_numpy(v[used : used + batch_size]).to(device) for k, v in merged.items()}
                used += batch_size
            pending = [{k: v[used:] for k, v in merged.items()}]
        left = {k: np.concatenate([p[k] for p in pending]) for k in pending[-1]} if pending else {}
        if left and len(next(iter(left.values()))) and not drop_last:
            yield {k: torch.from_numpy(v).to(device) for k, v in left.items()}


def read_parquet_dataset(dv: DatasetVersion, columns: list[str]):
    """A Ray Dataset of ``columns`` of the dataset version's parquet parts (local or remote storage)."""
    import ray.data

    files = dv.part_files("data")
    kwargs = {}
    if storage.is_remote(dv.uri):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        kwargs["filesystem"] = PyFileSystem(FSSpecHandler(storage.filesystem(dv.uri)[0]))
        files = [storage.filesystem(f)[1] for f in files]
    return ray.data.read_parquet(files, columns=columns, **kwargs)


def augment_batch(
    batch: dict[str, np.ndarray],
    *,
    seed: int = 0,
    flip: bool = True,
    epoch: int | None = None,
    alt_prob: float = 0.0,
) -> dict[str, np.ndarray]:
    """Shuffle rows (a new order every epoch) and flip images at random: colours and shapes survive a
    horizontal flip (no caption names left or right).

    The draws are a function of ``seed``, ``epoch`` and the batch's content, nothing else, so a training is
    reproducible from its seed. ``epoch`` defaults to Ray Data's execution index of the dataset this runs in
    (each epoch's pass over the training data is one execution)."""
    if epoch is None:
        epoch = _execution_index()
    rng = np.random.default_rng([_seed32(seed), int(epoch), _fingerprint(batch)])
    order = rng.permutation(len(batch["pixel_values"]))
    out = {k: v[order] for k, v in batch.items()}
    if flip:
        pixels = out["pixel_values"]  # [B, 3, S, S]
        flips = rng.random(len(pixels)) < 0.5
        pixels[flips] = pixels[flips][..., ::-1]
        out["pixel_values"] = np.ascontiguousarray(pixels)
    if ALT + "input_ids" in out:  # --caption-mix: each sample draws its caption anew every epoch
        use_alt = rng.random(len(order)) < alt_prob
        for name in ("input_ids", "attention_mask"):
            alt = out.pop(ALT + name)
            out[name] = np.where(use_alt[:, None], alt, out[name])
    return out


def _seed32(seed: int) -> int:
    """A non-negative seed for numpy and Ray Data (a negative ``--seed`` is a valid seed too)."""
    return int(seed) % 2**32


def _fingerprint(batch: dict[str, np.ndarray]) -> int:
    """A checksum of the batch's arrays (CRC32: cheap next to a training step): two batches of other rows draw other permutations."""
    crc = 0
    for key in sorted(batch):
        crc = zlib.crc32(np.ascontiguousarray(batch[key]).tobytes(), crc)
    return crc


def _execution_index() -> int:
    """How many times the current Ray Data dataset has been executed before (0 outside Ray Data). Ray Data keeps
    the index on the dataset's DataContext, which its tasks receive; ``RandomSeedConfig(reseed_after_execution=
    True)`` reseeds from the same index, so the block order and the flips of an epoch move together."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)


def count_train_rows(dv: DatasetVersion, eval_fraction: float) -> int:
    """Rows of the version outside the held-out split at ``eval_fraction``, counted file by file."""
    return sum(_per_file(dv, _file_train_rows, eval_fraction, split_columns(dv)))


def train_columns(dv: DatasetVersion, columns: Sequence[str] = TRAIN_COLUMNS) -> list[str]:
    """``columns`` plus ``phash`` when the version has it (the split reads it; without it, the image)."""
    return list(dict.fromkeys([*columns, *(c for c in split_columns(dv) if c != "image")]))
