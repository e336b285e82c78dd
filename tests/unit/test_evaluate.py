"""Retrieval recall@k and zero-shot accuracy on constructed embeddings, and evaluate_model on a tiny CLIP."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tasks.evaluate import evaluate_model, mlflow_metric_names, retrieval_metrics, zeroshot_accuracy
from vlforge.demo.synth import COLOURS, SHAPES, class_prompts, make_pairs

KEYS = [f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def one_hot(n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)


def test_perfect_embeddings_give_recall_one():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    metrics = retrieval_metrics(emb, emb.copy())
    assert set(metrics) == {*KEYS, "mean_recall"}
    assert all(metrics[k] == 1.0 for k in KEYS)
    assert metrics["mean_recall"] == 1.0


def test_shifted_captions_rank_second_everywhere():
    # text i describes image i+1: every query's own pair is ranked second (after the neighbour it matches).
    n = 12
    images = one_hot(n)
    texts = np.roll(one_hot(n), 1, axis=0)  # texts[i] == images[i - 1]
    metrics = retrieval_metrics(images, texts)
    for d in ("i2t", "t2i"):
        assert metrics[f"{d}_recall@1"] == 0.0
        assert metrics[f"{d}_recall@5"] == 1.0
        assert metrics[f"{d}_recall@10"] == 1.0
    assert metrics["mean_recall"] == pytest.approx(2 / 3)


def test_half_swapped_pairs_give_half_recall_at_one():
    n = 10
    images = one_hot(n)
    order = np.arange(n)
    order[[0, 1]] = order[[1, 0]]  # swap two pairs' captions
    order[[2, 3]] = order[[3, 2]]
    order[[4, 5, 6]] = order[[5, 6, 4]]
    texts = images[order]
    metrics = retrieval_metrics(images, texts, ks=(1, 2))
    assert metrics["i2t_recall@1"] == pytest.approx(3 / 10)
    assert metrics["t2i_recall@1"] == pytest.approx(3 / 10)
    assert metrics["i2t_recall@2"] == pytest.approx(1.0)
    assert set(metrics) == {"i2t_recall@1", "i2t_recall@2", "t2i_recall@1", "t2i_recall@2", "mean_recall"}


def test_groups_count_duplicate_captions_as_hits():
    # pairs 0 and 1 share a caption; text 0 is closest to image 1, which is as right as image 0.
    images = one_hot(4)
    texts = images[[1, 0, 2, 3]]
    assert retrieval_metrics(images, texts, ks=(1,))["t2i_recall@1"] == 0.5
    grouped = retrieval_metrics(images, texts, ks=(1,), groups=["a red circle", "a red circle", "b", "c"])
    assert grouped["t2i_recall@1"] == 1.0
    assert grouped["i2t_recall@1"] == 1.0


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        retrieval_metrics(np.zeros((3, 4)), np.zeros((2, 4)))


def test_zeroshot_accuracy_counts_argmax_hits():
    prompts = one_hot(3)
    images = np.array([[1, 0, 0], [0, 0.9, 0.1], [0.2, 0.7, 0.1]], dtype=np.float32)
    assert zeroshot_accuracy(images, prompts, [0, 1, 2]) == pytest.approx(2 / 3)


def test_mlflow_metric_names_are_accepted_by_mlflow():
    from mlflow.utils.validation import _validate_metric_name

    names = mlflow_metric_names({"i2t_recall@1": 0.5, "mean_recall": 0.25})
    assert names == {"eval_i2t_recall_at_1": 0.5, "eval_mean_recall": 0.25}
    for name in names:
        _validate_metric_name(name)


def test_evaluate_model_reports_recall_and_zeroshot_on_a_tiny_clip():
    from models.clip import build_clip

    pairs = make_pairs(16, seed=3)
    prompts = class_prompts()
    bundle = build_clip("clip-tiny", [p.caption for p in pairs] + prompts, seed=0)
    table = pa.table({"image": [p.image for p in pairs], "caption": [p.caption for p in pairs]})
    labels = [list(COLOURS).index(p.colour) * len(SHAPES) + SHAPES.index(p.shape) for p in pairs]

    metrics = evaluate_model(bundle, table, class_prompts=prompts, class_labels=labels, batch_size=8)

    assert all(0.0 <= metrics[k] <= 1.0 for k in KEYS)
    assert metrics["mean_recall"] == pytest.approx(np.mean([metrics[k] for k in KEYS]))
    assert 0.0 <= metrics["zeroshot_accuracy"] <= 1.0
    assert metrics["num_pairs"] == 16
    # recall@10 can never be below recall@1
    assert metrics["i2t_recall@10"] >= metrics["i2t_recall@1"]
    assert "zeroshot_accuracy" not in evaluate_model(bundle, table, batch_size=8)


def test_evaluate_model_names_missing_columns():
    from models.clip import build_clip

    bundle = build_clip("clip-tiny", ["a red circle"])
    with pytest.raises(ValueError, match="caption"):
        evaluate_model(bundle, pa.table({"image": [b"x"]}))
