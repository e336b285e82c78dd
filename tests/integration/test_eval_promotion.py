"""A champion trained on copies of the eval images against a clean challenger, on real tiny trainings.

The eval set is curated with --eval-set. The champion's data holds copies of its images (curated with
decontamination off, made champion by a person, as a champion from before eval sets would be); the
challenger's data is the same pool curated by default, which removes the copies. Promoting the challenger
on the eval set is refused (it stays challenger, the reason names the champion's contaminated data) rather
than judged by a comparison the champion wins by memory."""

from __future__ import annotations

import dataclasses
import io

import pytest
from PIL import Image

from tasks.curate import curate
from tasks.curate.filters import FilterConfig
from tasks.promotion import CHALLENGER, CHAMPION, override
from tasks.train.pretrain import pretrain
from tests.helpers import write_raw_batch
from vlforge.demo.synth import make_pairs

FAST = dict(
    epochs=1, batch_size=16, lr=3e-3, warmup_steps=2, log_every=2, min_eval_pairs=0, recipe="clip-tiny"
)


def _reencoded(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=50)
    return buf.getvalue()


@pytest.mark.slow  # three curations and two trainings on Ray
def test_a_champion_trained_on_eval_copies_cannot_be_compared_with_a_clean_challenger(settings, ray_local):
    evals = make_pairs(32, seed=80, prefix="ev")
    write_raw_batch(settings, "evsrc", "b1", evals)
    ev = curate("evsrc", "bench-set", settings, eval_set=True, track=False).dataset_version

    copies = [dataclasses.replace(p, key=f"c{i}", image=_reencoded(p.image)) for i, p in enumerate(evals)]
    write_raw_batch(settings, "web", "b1", make_pairs(96, seed=81, prefix="px") + copies)
    off = FilterConfig(decontaminate_against=["none"])
    dirty = curate("web", "dirty", settings, filters=off, track=False).dataset_version
    clean = curate("web", "clean", settings, track=False)
    assert dirty.manifest["counts"]["kept"] == 128 and dirty.manifest["decontamination"]["against"] == []
    assert clean.counts["contaminated"] >= 29  # >= 90% of the 32 copies removed
    assert clean.dataset_version.manifest["decontamination"]["against"] == [ev.ref]

    first = pretrain(dirty.ref, settings, eval_dataset=ev.ref, **FAST)
    # Its own figures on the eval set are untrustworthy too: not champion by the rule...
    assert (
        first.registered.alias == CHALLENGER
        and "refused to compare on eval set" in first.registered.decision.reason
    )
    override(
        first.model_uri, CHAMPION, settings, reason="promoted before eval sets existed"
    )  # ...but by hand

    second = pretrain(clean.dataset_version.ref, settings, eval_dataset=ev.ref, **FAST)
    decision = second.registered.decision
    assert second.registered.alias == CHALLENGER
    assert decision.reason.startswith(f"refused to compare on eval set {ev.ref}")
    assert f"{first.model_uri} was trained on {dirty.ref}" in decision.reason
    assert decision.comparisons == ()  # no comparison was made on the contaminated eval set
