"""The VLM recipes' data pipeline and worker side: rows of a dataset version become model-ready tensors in Ray
Data tasks, and :class:`VlmModelHooks` builds, trains and saves the model on each Ray Train worker.

- :func:`vlm_train_dataset`: a Ray Data pipeline over the dataset version with the same held-out split, turning
  rows into tensors with the processor saved in the init folder: ``input_ids``, ``attention_mask`` and ``labels``
  (-100 except on the response and its EOS) padded to the recipe's ``max_length``, and ``pixel_values``. Stage 1
  rows are (image, the recipe's caption prompt, caption); stage 2 rows are (image, ``prompt_col``,
  ``response_col``), columns carried from the URL list through ingest and curate.
- :class:`VlmModelHooks`: load the init folder, freeze what the stage freezes (``models.vlm_train.prepare_stage1``
  / ``prepare_stage2``; a checkpoint resumes its model or adapter), the model's next-token loss on the response
  tokens.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from vlforge import storage
from vlforge.datasets import DatasetVersion
from vlforge.errors import VlforgeError


def dataset_columns(dv: DatasetVersion) -> list[str]:
    """The column names of a dataset version (from its first part file's footer)."""
    import pyarrow.parquet as pq

    files = dv.part_files("data")
    if not files:
        raise VlforgeError(f"dataset {dv.ref} has no data files")
    fs, path = storage.filesystem(files[0])
    with fs.open(path, "rb") as fh:
        return list(pq.ParquetFile(fh).schema_arrow.names)


def check_text_columns(dv: DatasetVersion, columns: dict[str, str]) -> None:
    """Each of ``columns`` (column -> the option naming it) exists and has text in every row: one clear error
    naming the column (or the first rows without text) otherwise."""
    present = dataset_columns(dv)
    for column, option in columns.items():
        if column not in present:
            raise VlforgeError(
                f"dataset {dv.ref} has no column {column!r} ({option}); its columns: {', '.join(present)}. "
                "Carry it from the URL list (ingest keeps extra columns) or name another column"
            )
    from tasks.train.data import read_data_file

    empties: dict[str, list] = {column: [] for column in columns}
    for f in dv.part_files("data"):  # file by file: the driver never holds a whole version's columns
        table = read_data_file(f, ["key", *columns])
        keys = table.column("key").to_pylist()
        for column in columns:
            values = table.column(column).to_pylist()
            empties[column] += [k for k, v in zip(keys, values, strict=True) if not str(v or "").strip()]
    for column, option in columns.items():
        empty = empties[column]
        if empty:
            raise VlforgeError(
                f"dataset {dv.ref}: {len(empty)} row(s) have no text in column {column!r} ({option}), e.g. "
                f"key(s) {', '.join(map(str, empty[:5]))}"
            )


@functools.lru_cache(maxsize=4)
def load_vlm_processor(model_uri: str):
    """A weightless :class:`models.vlm.VlmBundle` (the saved processor and the model's config) for building
    batches in Ray Data tasks."""
    from types import SimpleNamespace

    from transformers import LlavaConfig, LlavaProcessor

    from models.convstem import register_auto_classes
    from models.resampler import CONFIG_KEY, ResamplerProcessor
    from models.vlm import VlmBundle
    from tasks.train.data import local_dir

    register_auto_classes()  # a conv-stem vision config inside the LLaVA config
    path = local_dir(model_uri)
    config = LlavaConfig.from_pretrained(path)
    processor_cls = ResamplerProcessor if getattr(config, CONFIG_KEY, None) else LlavaProcessor
    return VlmBundle(SimpleNamespace(config=config), processor_cls.from_pretrained(path))


def _rows(batch: dict, keep, caption_prompt: str, prompt_col: str | None, response_col: str | None):
    from models.vlm_train import Example
    from vlforge.hfformat import encoded_image

    rows, keys = [], []
    for i, k in enumerate(keep):
        if not k:
            continue
        prompt = str(batch[prompt_col][i]) if prompt_col else caption_prompt
        response = str(batch[response_col][i] if response_col else batch["caption"][i])
        rows.append(Example(encoded_image(batch["image"][i]), prompt, response))
        keys.append(str(batch["key"][i]))
    return rows, keys


def _build(bundle, rows, keys, max_length: int) -> dict:
    """``models.vlm_train.build_batch``; an error names the dataset row (key) it is about."""
    from models.vlm_train import build_batch

    try:
        return build_batch(bundle, rows, max_length)
    except VlforgeError:
        for row, key in zip(rows, keys, strict=True):
            try:
                build_batch(bundle, [row], max_length)
            except VlforgeError as exc:
                raise VlforgeError(f"dataset row {key!r}: {str(exc).partition(': ')[2] or exc}") from None
        raise


def preprocess_vlm_batch(
    batch: dict[str, np.ndarray],
    *,
    model_uri: str,
    eval_fraction: float,
    caption_prompt: str,
    max_length: int,
    prompt_col: str | None = None,
    response_col: str | None = None,
    caption_share: float = 0.0,
) -> dict[str, np.ndarray]:
    """Drop held-out rows; build (image, prompt, response) training tensors padded to ``max_length``. With
    ``prompt_col`` and ``caption_share``, that share of the rows (by key) also gives a caption conversation."""
    from models.vlm_train import IGNORE_INDEX, with_caption_conversations
    from tasks.train.data import content_eval_mask

    bundle = load_vlm_processor(model_uri)
    keep = ~content_eval_mask(batch, eval_fraction)
    rows, keys = _rows(batch, keep, caption_prompt, prompt_col, response_col)
    if prompt_col and caption_share > 0:
        captions = [str(c) for c, k in zip(batch["caption"], keep, strict=True) if k]
        rows, keys = with_caption_conversations(rows, keys, captions, caption_prompt, caption_share)
    image_size = int(bundle.model.config.vision_config.image_size)
    if not rows:
        empty = np.zeros((0, max_length), dtype=np.int64)
        return {
            "input_ids": empty,
            "attention_mask": empty.copy(),
            "labels": empty.copy(),
            "pixel_values": np.zeros((0, 3, image_size, image_size), dtype=np.float32),
        }
    built = _build(bundle, rows, keys, max_length)
    tok = bundle.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = {}
    for name, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        values = built[name].numpy().astype(np.int64)
        padded = np.full((values.shape[0], max_length), fill, dtype=np.int64)
        padded[:, : values.shape[1]] = values
        out[name] = padded
    out["pixel_values"] = np.ascontiguousarray(built["pixel_values"].float().numpy(), dtype=np.float32)
    return out


def vlm_row_bytes(model_uri: str, max_length: int) -> int:
    """The size of one VLM training row's tensors (pixels; token ids, mask and labels)."""
    size = int(load_vlm_processor(model_uri).model.config.vision_config.image_size)
    return 3 * size * size * 4 + 3 * max_length * 8


def vlm_train_dataset(
    dv: DatasetVersion,
    model_uri: str,
    *,
    eval_fraction: float,
    caption_prompt: str,
    max_length: int,
    prompt_col: str | None = None,
    response_col: str | None = None,
    seed: int = 0,
    caption_share: float = 0.0,
):
    """A Ray Dataset of VLM training tensors (the train split), built once and reshuffled every epoch."""
    from tasks.train.data import tensor_dataset, train_columns

    mixed = [prompt_col, response_col, "caption"] if caption_share > 0 else [prompt_col, response_col]
    columns = train_columns(dv, ["key", "image", *(mixed if prompt_col else ["caption"])])
    settings = {
        "model_uri": model_uri,
        "eval_fraction": eval_fraction,
        "caption_prompt": caption_prompt,
        "max_length": max_length,
        "prompt_col": prompt_col,
        "response_col": response_col,
        "caption_share": caption_share,
    }
    row_bytes = vlm_row_bytes(model_uri, max_length)
    return tensor_dataset(dv, columns, preprocess_vlm_batch, settings, row_bytes, seed=seed, flip=False)


@dataclass(frozen=True)
class VlmModelHooks:
    """The worker side of the VLM recipes (the loop's ``model``): stage 1 (``lora is None``) trains the adapter
    (and the language model when ``train_language_model``, the vision tower when ``train_vision_tower``); stage 2 puts LoRA on the language model with the
    settings ``lora`` (``models.vlm_train.LoraSettings`` fields). A checkpoint holds ``model/`` (stage 1) or
    the peft ``adapter/`` (stage 2)."""

    train_language_model: bool = False
    train_vision_tower: bool = False
    lora: dict | None = None

    def build(self, init_dir: str, ckpt_dir: str | None):
        from models.vlm import load_vlm
        from models.vlm_train import prepare_stage1, prepare_stage2, resume_stage2

        if self.lora is None:
            bundle = load_vlm(os.path.join(ckpt_dir, "model") if ckpt_dir else init_dir)
            return bundle, prepare_stage1(bundle, self.train_language_model, self.train_vision_tower)
        bundle = load_vlm(init_dir)
        if ckpt_dir:
            return bundle, resume_stage2(bundle, os.path.join(ckpt_dir, "adapter"), trainable=True)
        return bundle, prepare_stage2(bundle, self.lora)

    def loss(self, module, batch):
        """The model's next-token loss on the response tokens; batches come padded to ``max_length`` (right
        padding) and are cut to their longest row first."""
        width = int(batch["attention_mask"].sum(dim=1).max())
        return module(
            input_ids=batch["input_ids"][:, :width],
            attention_mask=batch["attention_mask"][:, :width],
            labels=batch["labels"][:, :width],
            pixel_values=batch["pixel_values"],
        ).loss

    def after_step(self, module) -> dict[str, float]:
        return {}

    def save(self, bundle, module, folder: str) -> None:
        from tasks.train.loop import save_model_or_adapter

        save_model_or_adapter(bundle, module, folder, adapter=self.lora is not None)
