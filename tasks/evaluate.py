"""Evaluation of a CLIP on held-out image-caption pairs: retrieval recall@k both ways and zero-shot accuracy.

Recall is computed on the full [N, N] similarity matrix of a held-out split (row i of the image and text
embeddings is a pair). Pairs whose captions are identical are interchangeable (synthetic and web data repeat
captions), so :func:`evaluate_model` groups them: retrieving any member of the query's group counts as a hit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.clip import ClipBundle

DEFAULT_KS = (1, 5, 10)


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    groups: Sequence | None = None,
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k of row-aligned, L2-normalised embeddings [N, D].

    A query hits at k when a correct item is among its k most similar candidates. The correct item of query i
    is candidate i; with ``groups`` (one label per row), every candidate of the same group is correct.
    Returns ``i2t_recall@k``, ``t2i_recall@k`` for each k and ``mean_recall``, their mean.
    """
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image and text embeddings must both be [N, D], got {image_emb.shape} and {text_emb.shape}"
        )
    n = image_emb.shape[0]
    if n == 0:
        raise ValueError("cannot compute retrieval metrics on zero pairs")
    if groups is None:
        correct = np.eye(n, dtype=bool)  # [N, N]
    else:
        labels = np.asarray(list(groups))
        if labels.shape != (n,):
            raise ValueError(f"groups must have one label per row ({n}), got shape {labels.shape}")
        correct = labels[:, None] == labels[None, :]
    sims = image_emb @ text_emb.T  # [N images, N texts]
    metrics: dict[str, float] = {}
    for direction, matrix in (("i2t", sims), ("t2i", sims.T)):
        best_rank = _best_correct_rank(matrix, correct)
        for k in ks:
            metrics[f"{direction}_recall@{k}"] = float(np.mean(best_rank < k))
    recalls = [v for key, v in metrics.items() if "_recall@" in key]
    metrics["mean_recall"] = float(np.mean(recalls))
    return metrics


def _best_correct_rank(sims: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """For each query row, the 0-based rank of its best-scored correct candidate [N].

    The rank counts the wrong candidates scoring strictly higher than it, so a wrong candidate that merely
    ties the correct one (e.g. a duplicate embedding) does not push it out of the top k.
    """
    best_correct = np.where(correct, sims, -np.inf).max(axis=1, keepdims=True)  # [N, 1]
    return ((sims > best_correct) & ~correct).sum(axis=1)


def zeroshot_accuracy(image_emb: np.ndarray, prompt_emb: np.ndarray, labels: Sequence[int]) -> float:
    """Share of images whose most similar class prompt is their label: image_emb [N, D], prompt_emb [C, D]."""
    pred = np.argmax(np.asarray(image_emb) @ np.asarray(prompt_emb).T, axis=1)  # [N]
    return float(np.mean(pred == np.asarray(labels)))


@torch.no_grad()
def embed_images(bundle: ClipBundle, images: Sequence[bytes], batch_size: int = 64) -> np.ndarray:
    """L2-normalised image embeddings, float32 [N, D], computed in batches."""
    bundle.model.eval()
    device = next(bundle.model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        pixels = bundle.preprocess_images(images[start : start + batch_size]).to(device)
        out.append(bundle.embed_images(pixels).float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def embed_texts(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised text embeddings, float32 [N, D], computed in batches."""
    bundle.model.eval()
    device = next(bundle.model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = bundle.tokenize(list(texts[start : start + batch_size]))
        out.append(bundle.embed_texts(**{k: v.to(device) for k, v in tokens.items()}).float().cpu().numpy())
    return np.concatenate(out)


def evaluate_model(
    bundle: ClipBundle,
    table: pa.Table,
    *,
    class_prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Retrieval recall@1/5/10 both ways (and ``zeroshot_accuracy`` with prompts and labels) on ``table``.

    ``table`` holds the held-out pairs: columns ``image`` (encoded bytes) and ``caption``. ``class_labels``
    gives each row's index into ``class_prompts``.
    """
    missing = {"image", "caption"} - set(table.column_names)
    if missing:
        raise ValueError(f"evaluation table lacks column(s) {sorted(missing)}; it needs image and caption")
    if table.num_rows == 0:
        raise ValueError("evaluation table is empty: hold out at least one pair")
    images = table.column("image").to_pylist()
    captions = [str(c) for c in table.column("caption").to_pylist()]
    image_emb = embed_images(bundle, images, batch_size)
    text_emb = embed_texts(bundle, captions, batch_size)
    metrics = retrieval_metrics(image_emb, text_emb, groups=captions)
    if class_prompts and class_labels is not None:
        if len(class_labels) != table.num_rows:
            raise ValueError(f"class_labels has {len(class_labels)} labels for {table.num_rows} rows")
        prompt_emb = embed_texts(bundle, class_prompts, batch_size)
        metrics["zeroshot_accuracy"] = zeroshot_accuracy(image_emb, prompt_emb, class_labels)
    metrics["num_pairs"] = float(table.num_rows)
    return metrics


def mlflow_metric_names(metrics: dict[str, float], prefix: str = "eval_") -> dict[str, float]:
    """The metrics under names MLflow accepts (it rejects ``@``): ``i2t_recall@1`` -> ``eval_i2t_recall_at_1``."""
    return {prefix + re.sub(r"[^/\w.\- ]", "_", k.replace("@", "_at_")): float(v) for k, v in metrics.items()}


# NO_CACHE: the inputs (a torch model, image bytes) are neither worth hashing nor cacheable.
evaluate_task = task(name="evaluate", cache_policy=NO_CACHE)(evaluate_model)
