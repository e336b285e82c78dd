"""Decontamination end to end: an eval set curated with --eval-set, a pool holding copies of its images
(the same bytes, re-encoded, rescaled, border-cropped, or cropped, rescaled and re-encoded at once) curated on
Ray: the copies go to rejected/ as ``contaminated`` with the eval row they copy, distinct images of the same
classes stay."""

from __future__ import annotations

import dataclasses
import io

import pytest
from PIL import Image

from tasks.curate import curate
from tasks.curate.card import read_card
from tasks.curate.decontam import DecontaminationError
from tasks.curate.filters import FilterConfig
from tests.helpers import write_raw_batch
from vlforge import tracking
from vlforge.demo.synth import make_shape_pairs


def _variant(data: bytes, how: str) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if how in ("crop", "triple"):
        img = img.crop((3, 2, w - 3, h - 4))
    if how == "rescale":
        img = img.resize((w * 3 // 5, h * 3 // 5), Image.Resampling.BICUBIC)
    elif how == "triple":  # cropped, enlarged and re-encoded at once
        img = img.resize((img.width * 3 // 2, img.height * 3 // 2), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=40 if how in ("jpeg", "triple") else 90)
    return buf.getvalue()


@pytest.mark.slow  # two curations on Ray
def test_pool_copies_of_eval_images_are_dropped_as_contaminated(settings, ray_local):
    # Noisy drawings of 30 classes (vlforge.demo.synth.SHAPES30): copy detection must tell a copy from another drawing of
    # the class. (A cropped copy of a noise-free drawing is found only when it matches far closer: BENCHMARKS.)
    evals = make_shape_pairs(24, seed=50, prefix="ev")
    write_raw_batch(settings, "evsrc", "b1", evals)
    ev = curate("evsrc", "heldout-set", settings, eval_set=True, track=False).dataset_version
    assert ev.manifest["eval_set"] is True and ev.manifest["decontamination"]["against"] == []

    distinct = make_shape_pairs(40, seed=60, prefix="px")
    kinds = ("same", "jpeg", "rescale", "crop", "triple")
    copies = [
        dataclasses.replace(
            evals[i], key=f"copy{i}", image=evals[i].image if k == "same" else _variant(evals[i].image, k)
        )
        for i, k in zip(range(15), kinds * 3, strict=True)
    ]
    write_raw_batch(settings, "web", "b1", distinct + copies, shard_size=20)
    res = curate("web", "pool", settings)  # default: against every eval set
    dv = res.dataset_version
    assert res.counts["contaminated"] >= 14  # >= 90% of the 15 copies
    rejected = dv.read_table("rejected").to_pylist()
    caught = [r for r in rejected if r["reason"] == "contaminated"]
    copy_captions = {p.caption for p in copies}
    assert sum(r["caption"] in copy_captions for r in caught) >= 14
    assert len(caught) - sum(r["caption"] in copy_captions for r in caught) <= 1  # distinct images stay
    assert all(f"eval image {ev.ref} key " in r["reason_detail"] for r in caught)
    m = dv.manifest
    assert m["decontamination"]["against"] == [ev.ref] and m["decontamination"]["contaminated"] == len(caught)
    assert ev.ref in read_card(dv) and "contaminated" in read_card(dv)
    data = dv.read_table("data", columns=["phash"])
    assert data.column("phash").null_count == 0  # the split reads it
    client = tracking.configure(settings)
    run = client.get_run(m["mlflow_run_id"])
    assert any("contaminated" in k and v == len(caught) for k, v in run.data.metrics.items())
    assert run.data.params["decontaminated_against"] == ev.ref

    # Opting out keeps the copies; naming a missing eval set is one clear error.
    none = curate(
        "web", "pool-raw", settings, filters=FilterConfig(decontaminate_against=["none"]), track=False
    )
    assert (
        none.counts.get("contaminated", 0) == 0
        and none.dataset_version.manifest["decontamination"]["against"] == []
    )
    with pytest.raises(DecontaminationError, match="no-such-set"):
        curate("web", "pool-raw", settings, filters=FilterConfig(decontaminate_against=["no-such-set"]))
