"""Evaluation of a VLM: greedy answers on held-out rows; caption accuracy (the generated caption names every truth
word) and, where the rows have a prompt and a response, instruction exact-match accuracy; each with its bootstrap
95% interval and the same model on a blank image as a baseline. Promotion is the CLIP rule (``tasks.promotion``)
on these per-row hits: stage 1 against the ``vlforge-vlm`` champion on the same held-out pairs, stage 2 against its
base on the held-out instructions (and its base's held-out captions as the general set).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from tasks.train.vlm_data import check_text_columns, dataset_columns
from vlforge.errors import VlforgeError
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
