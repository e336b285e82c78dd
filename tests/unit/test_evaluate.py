"""Retrieval recall@k and zero-shot accuracy on constructed embeddings, bootstrap intervals and the paired
difference on synthetic scores, and evaluate on a tiny CLIP."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tasks.evaluate import (
    Evaluation,
    bootstrap_means,
    class_labels_for,
    evaluate,
    interval,
    mlflow_metric_names,
    paired_difference,
    retrieval_hits,
    retrieval_metrics,
    zeroshot_accuracy,
)
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


def test_per_pair_hits_average_to_the_recalls():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(30, 6)).astype(np.float32)
    texts = images + rng.normal(scale=0.8, size=images.shape).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    hits = retrieval_hits(images, texts)
    metrics = retrieval_metrics(images, texts)
    assert set(hits) == set(metrics)
    assert all(hits[k].shape == (30,) and float(hits[k].mean()) == pytest.approx(metrics[k]) for k in metrics)
    assert 0 < metrics["i2t_recall@1"] < 1  # the noise makes it a real test of the per-pair split


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(2)
    hits = (rng.random(400) < 0.5).astype(float)
    a, b = interval(hits), interval(hits)
    assert a == b  # seeded: the same figures every time
    assert a.low < a.value < a.high
    # a Bernoulli mean on 400 pairs: standard error 0.025, so the 95% interval is about +-0.05
    assert 0.08 < a.high - a.low < 0.12
    assert interval(np.ones(50)) == interval(np.ones(50)) and interval(np.ones(50)).low == 1.0
    assert bootstrap_means(hits, resamples=7).shape == (7,)


def test_paired_difference_finds_a_clear_win_and_not_a_tie():
    rng = np.random.default_rng(3)
    old = (rng.random(300) < 0.4).astype(float)
    better = old.copy()
    better[np.flatnonzero(old == 0)[:45]] = 1.0  # right on 45 more pairs (0.15 of 300), wrong on none
    win = paired_difference(better, old)
    assert win.value == pytest.approx(0.15) and win.low > 0
    tie = paired_difference(old, old)
    assert (tie.low, tie.value, tie.high) == (0.0, 0.0, 0.0)
    # same accuracy, different pairs right: a tie the interval must not call a win
    swapped = old.copy()
    ones, zeros = np.flatnonzero(old == 1)[:30], np.flatnonzero(old == 0)[:30]
    swapped[ones], swapped[zeros] = 0.0, 1.0
    even = paired_difference(swapped, old)
    assert even.value == 0.0 and even.low < 0 < even.high


def test_pairing_narrows_the_interval_of_correlated_models():
    # two models right on mostly the same (easy) pairs: pairing cancels what the pairs share
    rng = np.random.default_rng(4)
    easy = rng.random(300) < 0.5
    old = (easy | (rng.random(300) < 0.05)).astype(float)
    new = (easy | (rng.random(300) < 0.12)).astype(float)
    paired = paired_difference(new, old)
    a, b = bootstrap_means(new, seed=1), bootstrap_means(old, seed=2)  # independent resamples
    unpaired_width = np.subtract(*np.percentile(a - b, [97.5, 2.5]))
    assert paired.high - paired.low < unpaired_width / 2


def test_evaluation_metrics_carry_intervals_under_mlflow_names():
    from mlflow.utils.validation import _validate_metric_name

    ev = Evaluation.of("d@v#heldout0.1", {"mean_recall": np.array([0.0, 0.5, 1.0, 1.0])})
    metrics = ev.metrics()
    assert metrics["mean_recall"] == pytest.approx(0.625)
    assert metrics["mean_recall_ci_low"] <= 0.625 <= metrics["mean_recall_ci_high"]
    assert metrics["num_pairs"] == 4 and ev.primary_metric == "mean_recall"
    for name in mlflow_metric_names({"i2t_recall@1_ci_low": 0.1, **metrics}):
        _validate_metric_name(name)
    with pytest.raises(ValueError, match="same pairs"):
        Evaluation.of("d", {"a": np.zeros(3), "b": np.zeros(4)})


def test_mlflow_metric_names_are_accepted_by_mlflow():
    from mlflow.utils.validation import _validate_metric_name

    names = mlflow_metric_names({"i2t_recall@1": 0.5, "mean_recall": 0.25})
    assert names == {"eval_i2t_recall_at_1": 0.5, "eval_mean_recall": 0.25}
    for name in names:
        _validate_metric_name(name)


def test_class_labels_follow_the_caption_class_phrase():
    prompts = class_prompts()
    labels = class_labels_for(["a red circle", "picture of a blue cross on a grey background"], prompts)
    assert [prompts[i] for i in labels] == ["a photo of a red circle", "a photo of a blue cross"]
    assert class_labels_for(["a dog"], prompts) is None


def test_evaluate_reports_recall_and_zeroshot_with_intervals_on_a_tiny_clip():
    from models.clip import build_clip

    pairs = make_pairs(16, seed=3)
    prompts = class_prompts()
    bundle = build_clip("clip-tiny", [p.caption for p in pairs] + prompts, seed=0)
    table = pa.table({"image": [p.image for p in pairs], "caption": [p.caption for p in pairs]})
    labels = [list(COLOURS).index(p.colour) * len(SHAPES) + SHAPES.index(p.shape) for p in pairs]

    ev = evaluate(bundle, table, "synth", class_prompts=prompts, batch_size=8)
    metrics = ev.metrics()

    assert all(0.0 <= metrics[k] <= 1.0 for k in KEYS)
    assert metrics["mean_recall"] == pytest.approx(np.mean([metrics[k] for k in KEYS]))
    assert ev.primary_metric == "zeroshot_accuracy" and ev.num_pairs == 16
    assert ev.per_pair["zeroshot_accuracy"].tolist() == zeroshot_hits_of(bundle, table, prompts, labels)
    for k in [*KEYS, "mean_recall", "zeroshot_accuracy"]:
        assert metrics[k + "_ci_low"] <= metrics[k] <= metrics[k + "_ci_high"]
    # recall@10 can never be below recall@1
    assert metrics["i2t_recall@10"] >= metrics["i2t_recall@1"]
    plain = evaluate(bundle, table, "synth", batch_size=8)
    assert "zeroshot_accuracy" not in plain.per_pair and plain.primary_metric == "mean_recall"


def zeroshot_hits_of(bundle, table, prompts, labels) -> list[float]:
    from tasks.evaluate import embed_images, embed_texts

    img = embed_images(bundle, table.column("image").to_pylist())
    pred = np.argmax(img @ embed_texts(bundle, prompts).T, axis=1)
    return (pred == np.array(labels)).astype(float).tolist()


def test_evaluate_names_missing_columns():
    from models.clip import build_clip

    bundle = build_clip("clip-tiny", ["a red circle"])
    with pytest.raises(ValueError, match="caption"):
        evaluate(bundle, pa.table({"image": [b"x"]}), "x")


def test_evaluate_sets_names_metrics_per_set_and_skips_tiny_sets(settings):
    from models.clip import build_clip
    from tasks.evaluate import evaluate_sets
    from tasks.train.data import heldout_ref
    from tests.helpers import publish_synthetic_dataset

    dv, pairs = publish_synthetic_dataset(settings, "evalsets", n=20, seed=6)
    bundle = build_clip("clip-tiny", [p.caption for p in pairs], seed=0)
    refs = [heldout_ref(dv, 0.5), dv.ref, heldout_ref(dv, 1e-9)]  # the last holds out nothing
    evaluations, logged = evaluate_sets(bundle, refs, settings)
    assert [e.eval_data for e in evaluations] == refs[:2]
    assert evaluations[1].num_pairs == 20 and 0 < evaluations[0].num_pairs < 20
    assert logged["eval_num_pairs"] == evaluations[0].num_pairs
    assert logged["eval_evalsets_mean_recall_ci_low"] <= logged["eval_evalsets_mean_recall"]
