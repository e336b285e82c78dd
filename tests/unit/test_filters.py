"""Every filter and reason, on small hand-made tables (no Ray, no model)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tasks.curate import filters as F
from tasks.curate.filters import FilterConfig, FilterConfigError, apply_filters
from tasks.curate.language import detect_language
from tasks.curate.stage import resolve_filters


def table(**cols):
    n = len(next(iter(cols.values())))
    base = {
        "key": [f"k{i}" for i in range(n)],
        "caption": ["a red circle on a white background"] * n,
        "status": ["success"] * n,
        "width": [64] * n,
        "height": [64] * n,
        "sha256": [f"h{i}" for i in range(n)],
    }
    base.update(cols)
    return pa.table(base)


def test_defaults_keep_ordinary_images():
    t = table(width=[64, 640, 1024, 300], height=[64, 480, 768, 200])
    dec = apply_filters(t, FilterConfig())
    assert dec.keep.all() and dec.counts()["rejected"] == 0


def test_download_failed_rows_are_rejected_with_the_error():
    t = table(status=["success", "failed_to_download"], error_message=[None, "HTTP 404"])
    dec = apply_filters(t, FilterConfig())
    assert dec.keep.tolist() == [True, False]
    assert dec.reason[1] == F.DOWNLOAD_FAILED and "404" in dec.reason_detail[1]


def test_decode_failed():
    dec = apply_filters(table(decode_ok=[True, False]), FilterConfig())
    assert dec.reason == [None, F.DECODE_FAILED]


def test_min_size_uses_original_size_and_reports_it():
    t = table(width=[64, 64], height=[64, 64], original_width=[10, 640], original_height=[300, 480])
    dec = apply_filters(t, FilterConfig(min_image_size=32))
    assert dec.reason == [F.TOO_SMALL, None] and dec.reason_value[0] == 10


def test_aspect_ratio():
    dec = apply_filters(table(width=[400, 100], height=[100, 100]), FilterConfig(max_aspect_ratio=3.0))
    assert dec.reason == [F.BAD_ASPECT_RATIO, None] and dec.reason_value[0] == pytest.approx(4.0)


def test_caption_length_short_and_long():
    t = table(caption=["hi", "a fine caption", "x" * 50])
    dec = apply_filters(t, FilterConfig(min_caption_chars=5, max_caption_chars=20))
    assert dec.reason == [F.CAPTION_TOO_SHORT, None, F.CAPTION_TOO_LONG]
    assert dec.reason_value[2] == 50


def test_language_filter_drops_clear_other_languages_only():
    t = table(
        caption=["a red circle on the white background", "un cercle rouge sur le fond blanc", "Fido the dog"]
    )
    dec = apply_filters(t, FilterConfig(languages=["en"]))
    assert dec.reason == [None, F.WRONG_LANGUAGE, None]  # "Fido the dog": too little evidence, kept
    assert detect_language("красный круг на белом фоне") == "ru"


def test_min_score_threshold_carries_the_score():
    scores = np.array([0.1, 0.3, 0.5], dtype=np.float32)
    dec = apply_filters(table(key=["a", "b", "c"]), FilterConfig(min_score=0.28), scores)
    assert dec.reason == [F.LOW_CLIP_SCORE, None, None]
    assert dec.reason_value[0] == pytest.approx(0.1) and "0.28" in dec.reason_detail[0]


def test_top_fraction_keeps_the_best_of_the_eligible_pool():
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.95], dtype=np.float32)
    t = table(key=list("abcdef"), status=["success"] * 5 + ["failed_to_download"])
    dec = apply_filters(t, FilterConfig(top_fraction=0.4), scores)
    # pool = 5 downloaded rows -> keep ceil(0.4*5)=2 best: a (0.9), d (0.7)
    assert dec.keep.tolist() == [True, False, False, True, False, False]
    assert dec.reason[1] == F.OUTSIDE_TOP_FRACTION and dec.reason[5] == F.DOWNLOAD_FAILED


def test_exact_duplicates_keep_the_best_scored_copy():
    t = table(key=list("abc"), sha256=["x", "x", "y"])
    dec = apply_filters(t, FilterConfig(), np.array([0.2, 0.6, 0.1], dtype=np.float32))
    assert dec.reason == [F.DUPLICATE, None, None] and "key b" in dec.reason_detail[0]
    dec = apply_filters(t, FilterConfig(exact_dedup=False), np.array([0.2, 0.6, 0.1], dtype=np.float32))
    assert dec.keep.all()


def test_near_duplicates_by_image_embedding_cosine():
    emb = np.array([[1, 0, 0], [0.99, 0.141, 0], [0, 1, 0]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores = np.array([0.3, 0.4, 0.2], dtype=np.float32)
    dec = apply_filters(table(key=list("abc")), FilterConfig(near_dup_threshold=0.95), scores, emb)
    assert dec.reason == [F.NEAR_DUPLICATE, None, None]  # a ~ b, b scored higher
    assert dec.reason_value[0] > 0.95 and "key b" in dec.reason_detail[0]
    assert apply_filters(table(key=list("abc")), FilterConfig(), scores, emb).keep.all()  # off by default


def test_each_row_gets_only_the_first_reason_and_counts_add_up():
    t = table(caption=["x", "fine caption"], width=[5, 64], height=[5, 64])
    dec = apply_filters(t, FilterConfig())
    c = dec.counts()
    assert dec.reason[0] == F.TOO_SMALL and c["caption_too_short"] == 0
    assert c["input"] == c["kept"] + c["rejected"] == sum(c[r] for r in F.REASONS) + c["kept"]


def test_min_score_and_top_fraction_together_is_a_clear_error():
    with pytest.raises(FilterConfigError, match="either --min-score"):
        resolve_filters(None, 0.2, 0.3)
    with pytest.raises(FilterConfigError, match="either --min-score"):
        FilterConfig(min_score=0.2, top_fraction=0.3)


def test_score_filters_without_scores_is_a_clear_error():
    with pytest.raises(FilterConfigError, match="--scorer"):
        apply_filters(table(key=["a"]), FilterConfig(min_score=0.1))
