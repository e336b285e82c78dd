"""The VLM recipes on the one training driver: LLaVA stage 1 (adapter pretraining on image-caption pairs,
registered as ``vlforge-vlm``) and stage 2 (instruction tuning with LoRA on the language model, registered as
``vlforge-vlm-lora``: the merged model plus the adapter).

What differs from CLIP, hook by hook (see docs/training.md and docs/vlm.md):

- ``train_dataset``: a Ray Data pipeline over the dataset version with the same held-out split, turning rows into
  model-ready tensors in Ray Data tasks with the processor saved in the init folder: ``input_ids``,
  ``attention_mask`` and ``labels`` (-100 except on the response and its EOS) padded to the recipe's
  ``max_length``, and ``pixel_values``. Stage 1 rows are (image, the recipe's caption prompt, caption); stage 2
  rows are (image, ``prompt_col``, ``response_col``), columns carried from the URL list through ingest and curate.
- worker side (:class:`VlmModelHooks`): load the init folder, freeze what the stage freezes
  (``models.vlm_train.prepare_stage1`` / ``prepare_stage2``; a checkpoint resumes its model or adapter), the
  model's next-token loss on the response tokens.
- evaluation (:class:`VlmEvaluator`): greedy answers on the held-out rows; caption accuracy (the generated caption
  names every truth word) and, where the rows have a prompt and a response, instruction exact-match accuracy; each
  with its bootstrap 95% interval and the same model on a blank image as a baseline. Promotion is the CLIP rule
  (``tasks.promotion``) on these per-row hits: stage 1 against the ``vlforge-vlm`` champion on the same held-out
  pairs, stage 2 against its base on the held-out instructions (and its base's held-out captions as the general
  set).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.train.args import FinetuneArgs, PretrainArgs
from tasks.train.driver import Recipe, TrainingRun
from vlforge import defaults, storage
from vlforge.datasets import DatasetVersion
from vlforge.errors import ModelNotFoundError, VlforgeError
from vlforge.settings import Settings

CAPTION_ACCURACY = "caption_accuracy"
INSTRUCTION_ACCURACY = "instruction_accuracy"
BLANK = "blank_"
EVAL_MAX_NEW_TOKENS = 24
# Words a caption's truth leaves out when the data has no label column (template words, not content).
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "on",
        "in",
        "at",
        "with",
        "and",
        "or",
        "is",
        "are",
        "this",
        "that",
        "to",
        "photo",
        "picture",
        "image",
        "background",
    ]
)
LABEL_COLUMN = "label"
INSTRUCTIONS = "#instructions"  # appended to an eval-data name: its rows' prompts and responses are evaluated
CLIP_MODEL_NAMES = ("vlforge-clip", "vlforge-clip-lora")


def is_vlm_recipe(name: str | None) -> bool:
    from models.vlm import list_vlm_recipes

    return bool(name) and name in list_vlm_recipes()


def _default(args, field_name: str, recipe_value):
    """``recipe_value`` when ``args.<field_name>`` is left at its default, else the value given."""
    value = getattr(args, field_name)
    return recipe_value if value == type(args).model_fields[field_name].default else value


# ---------------------------------------------------------------------------------------------------- data


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


# ---------------------------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class VlmModelHooks:
    """The worker side of the VLM recipes (the loop's ``model``): stage 1 (``lora is None``) trains the adapter
    (and the language model when ``train_language_model``, the vision tower when ``train_vision_tower``); stage 2
    puts LoRA on the language model with the settings ``lora`` (``models.vlm_train.LoraSettings`` fields). A
    checkpoint holds ``model/`` (stage 1) or the peft ``adapter/`` (stage 2)."""

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


# ----------------------------------------------------------------------------------------------- evaluation


def caption_truths(captions: Sequence[str], labels: Sequence[str] | None = None) -> list[list[str]]:
    """The words a generated caption must name: the row's ``label`` (e.g. "red circle") when the data has one,
    else the reference caption's words without template words (:data:`STOP_WORDS`)."""
    out = []
    for i, caption in enumerate(captions):
        label = labels[i] if labels is not None else None
        words = re.findall(r"[a-z]+", str(label or caption).lower())
        out.append(words if label else [w for w in words if w not in STOP_WORDS])
    return out


def vlm_hits(
    bundle, table: pa.Table, *, caption_prompt: str, instructions: bool, full: bool, max_new_tokens: int
) -> dict[str, np.ndarray]:
    """Per-row 0/1 hits of the primary metric: ``instruction_accuracy`` (exact match) on an instruction set
    (columns ``prompt``, ``response``), else ``caption_accuracy`` (every truth word named). With ``full``, every
    metric the rows allow (captions too on an instruction set) and each on a blank image (``blank_*``)."""
    from models.vlm_eval import blank_image, exact_match, generate, names_all

    images = table.column("image").to_pylist()
    variants = [("", images)] + ([(BLANK, [blank_image()] * len(images))] if full else [])
    hits: dict[str, np.ndarray] = {}
    for prefix, imgs in variants:
        if instructions:
            prompts = [str(p) for p in table.column("prompt").to_pylist()]
            answers = generate(bundle, imgs, prompts, max_new_tokens)
            responses = [str(r) for r in table.column("response").to_pylist()]
            hits[prefix + INSTRUCTION_ACCURACY] = np.array(
                [exact_match(a, r) for a, r in zip(answers, responses, strict=True)], dtype=np.float64
            )
        if full or not instructions:
            captions = [str(c) for c in table.column("caption").to_pylist()]
            labels = table.column(LABEL_COLUMN).to_pylist() if LABEL_COLUMN in table.column_names else None
            generated = generate(bundle, imgs, [caption_prompt] * len(imgs), max_new_tokens)
            hits[prefix + CAPTION_ACCURACY] = np.array(
                [names_all(g, t) for g, t in zip(generated, caption_truths(captions, labels), strict=True)],
                dtype=np.float64,
            )
    return hits


@dataclass
class VlmEvaluator:
    """Evaluates a VLM (a loaded bundle or a model URI) on an eval-data name: the promotion rule's evaluator
    for VLMs (``tasks.promotion.promote(evaluator=...)``).

    ``NAME@VERSION#heldoutF`` (or ``NAME[@VERSION]``) is a caption set: caption accuracy on the split's images.
    The same name with :data:`INSTRUCTIONS` appended is an instruction set: exact-match accuracy on its rows'
    ``prompt_col`` and ``response_col``. A fine-tune is thereby decided on instructions against its base, and its
    general set (the base's held-out pairs) on captions."""

    settings: Settings
    caption_prompt: str
    prompt_col: str = "prompt"
    response_col: str = "response"
    full: bool = False  # every metric and the blank-image baseline (the new model's own evaluation)
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS
    tables: dict = field(default_factory=dict, repr=False)

    def table(self, eval_data: str) -> pa.Table:
        """The eval rows: image, caption[, label][, prompt, response]."""
        if eval_data not in self.tables:
            self.tables[eval_data] = self._read(eval_data)
        return self.tables[eval_data]

    def _read(self, eval_data: str) -> pa.Table:
        from tasks.train.data import HELDOUT, content_eval_mask, train_columns
        from vlforge.datasets import resolve_dataset

        name, instructions = _instruction_set(eval_data)
        dataset, _, fraction = name.partition(HELDOUT)
        dv = resolve_dataset(self.settings, dataset)
        if instructions:
            check_text_columns(dv, {self.prompt_col: "--prompt-col", self.response_col: "--response-col"})
        present = dataset_columns(dv)
        columns = ["key", "image", "caption"] + ([LABEL_COLUMN] if LABEL_COLUMN in present else [])
        columns += [self.prompt_col, self.response_col] if instructions else []
        table = dv.read_table("data", columns=train_columns(dv, columns))
        if fraction:
            table = table.filter(pa.array(content_eval_mask(table, float(fraction))))
        table = table.select(columns)
        if instructions:
            renames = {self.prompt_col: "prompt", self.response_col: "response"}
            table = table.rename_columns([renames.get(c, c) for c in table.column_names])
        return table

    def instruction_set(self, eval_data: str) -> str:
        """The name of ``eval_data``'s rows as an instruction set when they have the prompt and response
        columns, else ``eval_data`` unchanged (a caption set)."""
        from tasks.train.data import HELDOUT
        from vlforge.datasets import resolve_dataset

        dv = resolve_dataset(self.settings, eval_data.partition(HELDOUT)[0])
        has = {self.prompt_col, self.response_col} <= set(dataset_columns(dv))
        return eval_data + INSTRUCTIONS if has else eval_data

    def __call__(self, model, eval_data: str):
        from tasks.evaluate import Evaluation

        table = self.table(eval_data)
        if table.num_rows == 0:
            raise VlforgeError(f"eval data {eval_data!r} has no rows")
        instructions = _instruction_set(eval_data)[1]
        bundle = load_vlm_model(model, self.settings) if isinstance(model, str) else model
        hits = vlm_hits(
            bundle,
            table,
            caption_prompt=self.caption_prompt,
            instructions=instructions,
            full=self.full,
            max_new_tokens=self.max_new_tokens,
        )
        primary = INSTRUCTION_ACCURACY if instructions else CAPTION_ACCURACY
        return Evaluation.of(eval_data, hits, primary=primary)

    def evaluate_sets(self, bundle, eval_refs: Sequence[str]) -> tuple[list, dict[str, float]]:
        """Like ``tasks.evaluate.evaluate_sets``: each set of at least two rows, metrics named for MLflow."""
        from tasks.evaluate import mlflow_metric_names
        from tasks.train.data import HELDOUT

        evaluations, logged = [], {}
        for ref in eval_refs:
            if self.table(ref).num_rows < 2:
                continue
            evaluation = self(bundle, ref)
            prefix = "eval_" if HELDOUT in ref else "eval_" + ref.split("@")[0] + "_"
            logged.update(mlflow_metric_names(evaluation.metrics(), prefix=prefix))
            evaluations.append(evaluation)
        return evaluations, logged


def _instruction_set(eval_data: str) -> tuple[str, bool]:
    """(the eval-data name without the :data:`INSTRUCTIONS` mark, whether it had it)."""
    if eval_data.endswith(INSTRUCTIONS):
        return eval_data[: -len(INSTRUCTIONS)], True
    return eval_data, False


def load_vlm_model(uri: str, settings: Settings):
    """A :class:`models.vlm.VlmBundle` from an MLflow URI or a folder."""
    from models.vlm import load_vlm
    from vlforge.registry import resolve_model_dir

    return load_vlm(resolve_model_dir(uri, settings))


def _pin(uri: str, settings: Settings) -> str:
    """``uri`` checked now (one clear error), an alias pinned to the version it names."""
    from vlforge.registry import check_model_uri, registered_version

    mv = registered_version(uri, settings)
    if mv is None:
        check_model_uri(uri, settings)
        return uri
    return f"models:/{mv.name}/{mv.version}"


def _model_type(uri: str, settings: Settings) -> str | None:
    """The ``model_type`` of a local model folder (None for registry URIs and hub ids)."""
    import json

    from vlforge.registry import is_mlflow_uri, resolve_model_dir

    if is_mlflow_uri(uri) or not os.path.isdir(uri):
        return None
    config = os.path.join(resolve_model_dir(uri, settings), "config.json")
    with open(config) as fh:
        return json.load(fh).get("model_type")


def _versions_file(folder: str) -> None:
    import json

    from models.vlm_train import VERSIONS_FILE, library_versions

    with open(os.path.join(folder, VERSIONS_FILE), "w") as fh:
        json.dump(library_versions(), fh, indent=2)


def _version_tags(recipe_name: str, vision_model: str | None) -> dict[str, str]:
    from models.vlm_train import library_versions
    from vlforge.tracking import TAG_RECIPE, TAG_VISION_MODEL

    tags = {f"vlforge.versions.{k}": v for k, v in library_versions().items()}
    tags[TAG_RECIPE] = recipe_name
    if vision_model:
        tags[TAG_VISION_MODEL] = vision_model
    return tags


# -------------------------------------------------------------------------------------------------- recipes


class VlmPretrainRecipe(Recipe):
    """LLaVA stage 1: a new VLM from a recipe (``models/configs/vlm``) with the CLIP ``vision_model``'s tower;
    trains the adapter (and a from-scratch language model) on image-caption pairs; registers ``vlforge-vlm``.
    ``lr``, ``batch_size`` and ``warmup_steps`` left at their defaults mean the recipe's stage-1 values
    (``stage1.learning_rate``, ``batch_size``, ``warmup_steps``) when it names them."""

    stage = "pretrain"

    def __init__(self, args: PretrainArgs):
        from models.vlm import ADAPTERS, load_vlm_recipe
        from vlforge.tracking import VLM_MODEL

        if args.init:
            raise VlforgeError("--init starts a CLIP pretraining; a VLM recipe starts from --vision-model")
        if args.adapter is not None and args.adapter not in ADAPTERS:
            raise VlforgeError(f"unknown adapter {args.adapter!r}; use one of {', '.join(ADAPTERS)}")
        self.vlm = load_vlm_recipe(args.recipe, adapter=args.adapter)
        stage1 = self.vlm.stage1
        args = args.model_copy(
            update={
                "lr": _default(args, "lr", float(stage1.get("learning_rate", args.lr))),
                "batch_size": _default(args, "batch_size", int(stage1.get("batch_size", args.batch_size))),
                "warmup_steps": _default(
                    args, "warmup_steps", int(stage1.get("warmup_steps", args.warmup_steps))
                ),
            }
        )
        super().__init__(args)
        self.model_name = VLM_MODEL
        self.vision_model = args.vision_model or self.vlm.vision_model

    def check(self, settings: Settings) -> None:
        self.vision_model = _pin(self.vision_model, settings)
        from models.convstem import CLIP_MODEL_TYPES

        kind = _model_type(self.vision_model, settings)
        if kind is not None and kind not in CLIP_MODEL_TYPES:
            raise VlforgeError(f"--vision-model {self.vision_model!r} holds a {kind!r} model, not a CLIP")
        # The vision tower's CLIP is what the VLM starts from: lineage walks back to it.
        self.base_model = self.vision_model

    def params(self) -> dict[str, Any]:
        return {
            "vlm_adapter": self.vlm.adapter,
            "vision_model": self.vision_model,
            "max_length": self.vlm.max_length,
        }

    def tags(self) -> dict[str, str]:
        from vlforge.tracking import TAG_RECIPE, TAG_VISION_MODEL

        return {TAG_RECIPE: self.vlm.name, TAG_VISION_MODEL: self.vision_model}

    def initial_model(self, dv, settings: Settings, heldout: float):
        """The recipe's VLM: the CLIP's vision tower, a new adapter, the language model (a from-scratch one gets
        a tokenizer trained on the train split's text)."""
        from models.vlm import build_vlm
        from tasks.train.data import train_captions

        text_columns = [c for c in ("caption", "prompt", "response") if c in dataset_columns(dv)]
        corpus = train_captions(dv, heldout, columns=text_columns) + [self.vlm.caption_prompt]
        return build_vlm(self.vlm, self.vision_model, corpus, settings=settings, seed=self.args.seed)

    def train_dataset(self, dv, init_uri: str, heldout: float):
        return vlm_train_dataset(
            dv, init_uri, eval_fraction=heldout, caption_prompt=self.vlm.caption_prompt,
            max_length=self.vlm.max_length, seed=self.args.seed,
        )  # fmt: skip

    def worker_hooks(self):
        return VlmModelHooks(
            train_language_model=self.vlm.train_language_model_in_stage1,
            train_vision_tower=self.vlm.train_vision_tower_in_stage1,
        )

    def final_model(self, ckpt_dir: str, tr: TrainingRun, model_dir: str):
        from models.vlm import load_vlm

        shutil.copytree(os.path.join(ckpt_dir, "model"), model_dir, dirs_exist_ok=True)
        _versions_file(model_dir)
        return load_vlm(model_dir), None

    def evaluator(self, settings: Settings, full: bool = False) -> VlmEvaluator:
        return VlmEvaluator(settings, self.vlm.caption_prompt, full=full)

    def evaluate(self, bundle, eval_refs, settings):
        """Caption accuracy (and its blank-image baseline) on each eval set's images."""
        return self.evaluator(settings, full=True).evaluate_sets(bundle, eval_refs)

    def registration(self, settings: Settings) -> dict[str, Any]:
        return {
            "pyfunc": "vlm",
            "evaluator": self.evaluator(settings),
            "tags": _version_tags(self.vlm.name, self.vision_model),
        }


class VlmFinetuneRecipe(Recipe):
    """LLaVA stage 2: instruction tuning of a VLM (``base``; the CLIP default means ``vlforge-vlm@champion``)
    with LoRA on its language model and the adapter trained in full, on rows with ``prompt_col`` and
    ``response_col``; registers ``vlforge-vlm-lora`` (merged, plus the adapter). Promoted only when it beats its
    base on the held-out instructions. ``lr`` and the LoRA rank, alpha and dropout left at their defaults mean
    the VLM recipe's stage-2 values."""

    stage = "finetune"

    def __init__(self, args: FinetuneArgs):
        from models.lora import LoraArgs
        from vlforge.tracking import VLM_LORA_MODEL

        defaults_lora = LoraArgs()
        if (args.lora.targets, args.lora.train_projections) != (
            defaults_lora.targets,
            defaults_lora.train_projections,
        ):
            raise VlforgeError(
                "--lora-targets and --lora-train-projections are CLIP settings: a VLM recipe puts LoRA on its "
                "language model's projections (the recipe's target_regex) and trains its adapter in full"
            )
        base = defaults.DEFAULT_VLM_URI if args.base == defaults.DEFAULT_MODEL_URI else args.base
        super().__init__(args.model_copy(update={"base": base}))
        self.model_name = VLM_LORA_MODEL
        self.base_model = base
        self.vlm = None  # the VLM recipe: named, or the base's (check)

    def check(self, settings: Settings) -> None:
        from models.vlm import list_vlm_recipes, load_vlm_recipe
        from vlforge.registry import registered_version

        self.base_model = _pin(self.args.base, settings)
        mv = registered_version(self.base_model, settings)
        if mv is not None and mv.name in CLIP_MODEL_NAMES:
            raise VlforgeError(
                f"--base {self.args.base!r} is a CLIP ({mv.name}); a VLM fine-tune starts from a VLM, e.g. "
                f"{defaults.DEFAULT_VLM_URI}"
            )
        kind = _model_type(self.base_model, settings)
        if kind not in (None, "llava"):
            raise VlforgeError(f"--base {self.args.base!r} holds a {kind!r} model, not a VLM (LLaVA)")
        name = self.args.recipe
        if name == defaults.VLM_FINETUNE_RECIPE:
            name = _base_recipe(mv, settings)
            if name is None:
                raise VlforgeError(
                    f"the base {self.args.base!r} records no VLM recipe; name it with --recipe "
                    f"({', '.join(list_vlm_recipes())})"
                )
        self.vlm = load_vlm_recipe(name)
        stage2 = self.vlm.stage2
        lora = stage2.get("lora", {})
        self.args = self.args.model_copy(
            update={
                "lr": _default(self.args, "lr", float(stage2.get("learning_rate", self.args.lr))),
                "lora": self.args.lora.model_copy(
                    update={
                        k: _default(self.args.lora, k, lora.get(k, getattr(self.args.lora, k)))
                        for k in ("r", "alpha", "dropout")
                    }
                ),
            }
        )

    def check_dataset(self, dv: DatasetVersion) -> None:
        check_text_columns(
            dv, {self.args.prompt_col: "--prompt-col", self.args.response_col: "--response-col"}
        )

    def params(self) -> dict[str, Any]:
        return {
            "base_version": self.base_model,
            "vlm_recipe": self.vlm.name,
            "max_length": self.vlm.max_length,
            "lora_target_regex": self.lora_settings()["target_regex"],
        }

    def tags(self) -> dict[str, str]:
        from vlforge.tracking import TAG_RECIPE

        return {TAG_RECIPE: self.vlm.name}

    def lora_settings(self) -> dict:
        """``models.vlm_train.LoraSettings`` fields: rank, alpha, dropout as settled in :meth:`check`, the
        recipe's target regex (default: the language model's projections)."""
        from models.vlm_train import LM_LORA_REGEX

        lora = self.args.lora
        return {
            "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
            "target_regex": self.vlm.stage2.get("lora", {}).get("target_regex") or LM_LORA_REGEX,
        }  # fmt: skip

    def initial_model(self, dv, settings: Settings, heldout: float):
        return load_vlm_model(self.base_model, settings)

    def train_dataset(self, dv, init_uri: str, heldout: float):
        return vlm_train_dataset(
            dv, init_uri, eval_fraction=heldout, caption_prompt=self.vlm.caption_prompt,
            max_length=self.vlm.max_length, prompt_col=self.args.prompt_col, response_col=self.args.response_col,
            seed=self.args.seed, caption_share=float(self.vlm.stage2.get("caption_share", 0.0)),
        )  # fmt: skip

    def worker_hooks(self):
        return VlmModelHooks(lora=self.lora_settings())

    def final_model(self, ckpt_dir: str, tr: TrainingRun, model_dir: str):
        """The base with the trained adapter, merged (a plain LLaVA folder) into ``model_dir``; the adapter folder
        beside it. Both record the transformers, peft and torch versions."""
        from models.vlm import load_vlm
        from models.vlm_train import resume_stage2, save_stage2
        from tasks.train.data import local_dir

        adapter_dir = model_dir.rstrip("/") + "-adapter"
        bundle = load_vlm(local_dir(tr.init_uri))
        peft_model = resume_stage2(bundle, os.path.join(ckpt_dir, "adapter"), trainable=False)
        return save_stage2(peft_model, bundle, model_dir, adapter_dir), adapter_dir

    def evaluator(self, settings: Settings, full: bool = False) -> VlmEvaluator:
        return VlmEvaluator(
            settings, self.vlm.caption_prompt, self.args.prompt_col, self.args.response_col, full=full
        )

    def evaluate(self, bundle, eval_refs, settings):
        """Instruction accuracy on each eval set whose rows have a prompt and a response (caption accuracy on
        the others), with caption accuracy and the blank-image baselines beside it."""
        evaluator = self.evaluator(settings, full=True)
        return evaluator.evaluate_sets(bundle, [evaluator.instruction_set(ref) for ref in eval_refs])

    def promotion(self) -> dict[str, Any]:
        """Against its base: it must win on the held-out instructions and may lose at most ``general_margin``
        of caption accuracy on the general set (``general_eval``, by default the base's held-out data)."""
        return {
            "fine_tune": True,
            "general_eval": self.args.general_eval,
            "general_margin": self.args.general_margin,
        }

    def registration(self, settings: Settings) -> dict[str, Any]:
        return {
            "pyfunc": "vlm",
            "evaluator": self.evaluator(settings),
            "tags": _version_tags(self.vlm.name, None),
        }


def _base_recipe(mv, settings: Settings) -> str | None:
    """The VLM recipe the registered version ``mv`` was trained with (its run's ``vlforge.recipe`` tag)."""
    if mv is None:
        return None
    from vlforge.tracking import TAG_RECIPE, configure

    name = configure(settings).get_run(mv.run_id).data.tags.get(TAG_RECIPE)
    return name if is_vlm_recipe(name) else None


def pretrain_recipe(args: PretrainArgs) -> Recipe:
    """The recipe a pretraining runs: a VLM recipe's stage 1 (``vlm-*``), else contrastive CLIP."""
    from tasks.train.pretrain import PretrainRecipe

    if is_vlm_recipe(args.recipe):
        return VlmPretrainRecipe(args)
    if args.vision_model or args.adapter:
        raise VlforgeError(
            f"--vision-model and --adapter are VLM settings; recipe {args.recipe!r} is a CLIP recipe (VLM "
            f"recipes: {', '.join(_vlm_names())})"
        )
    if not args.init:
        _check_clip_recipe(args.recipe)
    return PretrainRecipe(args)


def finetune_recipe(args: FinetuneArgs) -> Recipe:
    """The recipe a fine-tune runs: ``lora`` (CLIP) or a VLM recipe's stage 2 (``vlm`` or ``vlm-*``)."""
    from tasks.train.finetune import FinetuneRecipe

    if args.recipe == "lora":
        return FinetuneRecipe(args)
    if args.recipe == defaults.VLM_FINETUNE_RECIPE or is_vlm_recipe(args.recipe):
        return VlmFinetuneRecipe(args)
    raise VlforgeError(
        f"unknown fine-tune recipe {args.recipe!r}; use lora (CLIP), {defaults.VLM_FINETUNE_RECIPE} or a VLM "
        f"recipe ({', '.join(_vlm_names())})"
    )


def _vlm_names() -> list[str]:
    from models.vlm import list_vlm_recipes

    return list_vlm_recipes()


def _check_clip_recipe(name: str) -> None:
    from models.recipes import list_recipes, load_recipe

    try:
        load_recipe(name)
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"unknown recipe {name!r}; CLIP recipes: {', '.join(list_recipes())}; VLM recipes: "
            f"{', '.join(_vlm_names())}"
        ) from None
