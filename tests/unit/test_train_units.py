"""Training building blocks without Ray: split, schedule, step plan, preprocessing, LoRA merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.clip import build_clip
from models.lora import check_targets, merge_lora, trainable_parameters
from tasks.train.data import (
    content_eval_mask,
    content_hashes,
    dataset_heldout_fraction,
    eval_mask,
    heldout_fraction,
    heldout_fraction_of,
    heldout_ref,
    is_eval_key,
    preprocess_batch,
    read_eval_data,
    read_split,
)
from tasks.train.driver import steps_plan
from tasks.train.loop import cosine_with_warmup
from vlforge.demo.synth import make_pairs
from vlforge.errors import VlforgeError


def test_heldout_split_is_deterministic_and_near_the_fraction():
    keys = [f"img{i:06d}" for i in range(2000)]
    mask = eval_mask(keys, 0.1)
    assert mask.tolist() == eval_mask(keys, 0.1).tolist()
    assert 0.07 < mask.mean() < 0.13
    assert not eval_mask(keys, 0.0).any()
    assert is_eval_key(keys[int(np.argmax(mask))], 0.1)


def test_heldout_fraction_holds_out_at_least_the_minimum_and_stays_deterministic():
    many = [f"img{i:06d}" for i in range(5000)]
    assert heldout_fraction(many, 0.1) == 0.1  # ~500 held out: the fraction is larger than 200
    few = many[:600]
    f = heldout_fraction(few, 0.1)
    assert f > 0.1 and eval_mask(few, f).sum() == 200 and heldout_fraction(few, 0.1) == f
    assert all(is_eval_key(k, f) for k in np.array(few)[eval_mask(few, f)])
    assert eval_mask(many[:100], heldout_fraction(many[:100], 0.1)).sum() == 50  # at most half trains
    assert eval_mask(few, heldout_fraction(few, 0.1, min_eval_pairs=20)).sum() == eval_mask(few, 0.1).sum()
    assert heldout_fraction(few, 0.0, min_eval_pairs=0) == 0.0


def test_heldout_fraction_caps_a_large_split_at_the_maximum():
    keys = [f"img{i:06d}" for i in range(20000)]
    f = heldout_fraction(keys, 0.5, max_eval_pairs=1000)  # ~10,000 held out by the fraction: capped
    assert f < 0.5 and eval_mask(keys, f).sum() == 1000
    assert heldout_fraction(keys, 0.5, max_eval_pairs=0) == 0.5  # 0: no cap
    assert heldout_fraction(keys, 0.02, max_eval_pairs=1000) == 0.02  # ~400 held out: between the bounds
    # the minimum wins over a smaller maximum
    assert eval_mask(keys, heldout_fraction(keys, 0.5, min_eval_pairs=300, max_eval_pairs=100)).sum() == 300


@pytest.mark.parametrize("on_ray", [False, True], ids=["in-process", "ray-tasks"])
def test_dataset_split_file_by_file_equals_the_split_of_all_keys(settings, monkeypatch, request, on_ray):
    """A version of several data files: the threshold and the train count computed per file (on Ray tasks
    above LOCAL_FILES files) equal those of all its keys at once, for the minimum, the fraction and the cap."""
    import tasks.train.data as data
    from tasks.train.data import count_train_rows, dataset_split, train_captions
    from tests.helpers import publish_pairs

    if on_ray:
        request.getfixturevalue("ray_local")
        monkeypatch.setattr(data, "LOCAL_FILES", 1)
    pairs = make_pairs(900, seed=6)
    dv = publish_pairs(settings, "files", pairs, files=3)
    assert len(dv.part_files("data")) == 3
    hashes = content_hashes(dv.read_table("data", columns=["key", "image"]))
    for fraction, low, high in ((0.05, 200, 5000), (0.3, 0, 5000), (0.6, 0, 100)):
        f, train_rows = dataset_split(dv, fraction, low, high)
        assert (
            f
            == heldout_fraction_of(hashes, fraction, low, high)
            == dataset_heldout_fraction(dv, fraction, low, high)
        )
        trains = int((hashes / 2**32 >= f).sum())
        assert train_rows == trains  # from the one pass
        assert count_train_rows(dv, f) == trains == read_split(dv, f, "train").num_rows
    train = read_split(dv, 0.3, "train").column("caption").to_pylist()
    assert train_captions(dv, 0.3) == train and train_captions(dv, 0.3, limit=10) == train[:10]


def test_heldout_ref_reads_back_the_same_pairs(settings):
    from tests.helpers import publish_synthetic_dataset

    dv, _ = publish_synthetic_dataset(settings, "split", n=120, seed=4)
    f = dataset_heldout_fraction(dv, 0.1, min_eval_pairs=30)
    ref = heldout_ref(dv, f)
    assert ref.startswith(f"{dv.ref}#heldout")
    table = read_eval_data(ref, settings)
    expected = read_split(dv, f, "eval")
    # whole content groups (images sharing the split bits of their phash) are held out: at least 30 pairs
    assert 30 <= table.num_rows <= 40 and table.column_names == ["image", "caption"]
    assert table.column("caption").to_pylist() == expected.column("caption").to_pylist()
    assert read_eval_data(dv.ref, settings).num_rows == 120
    with pytest.raises(VlforgeError, match="not a fraction"):
        read_eval_data(f"{dv.ref}#heldoutx", settings)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_steps_plan_counts_equal_shards_and_rejects_too_little_data():
    assert steps_plan(300, 32, 1, 1, 10) == (9, 90)
    assert steps_plan(300, 32, 2, 1, 2) == (4, 8)
    assert steps_plan(300, 16, 1, 2, 1) == (9, 9)
    with pytest.raises(VlforgeError, match="too few"):
        steps_plan(20, 32, 1, 1, 1)


def test_preprocess_batch_drops_heldout_rows_and_yields_tensors(tmp_path):
    pairs = make_pairs(40, seed=3, size=48)
    bundle = build_clip("clip-tiny", [p.caption for p in pairs])
    bundle.save(str(tmp_path / "m"))
    batch = {
        "key": np.array([p.key for p in pairs], dtype=object),
        "caption": np.array([p.caption for p in pairs], dtype=object),
        "image": np.array([p.image for p in pairs], dtype=object),
    }
    out = preprocess_batch(batch, model_uri=str(tmp_path / "m"), eval_fraction=0.3)
    n_train = int((~content_eval_mask(batch, 0.3)).sum())  # the split reads the images, not the keys
    assert 0 < n_train < 40
    assert out["pixel_values"].shape == (n_train, 3, 32, 32) and out["pixel_values"].dtype == np.float32
    assert out["input_ids"].shape == (n_train, 32) and out["input_ids"].dtype == np.int64
    assert out["attention_mask"].sum(1).min() >= 3  # bos + a word + eos


def test_lora_trains_few_parameters_and_merges_to_the_same_function():
    from tests.helpers import lora_with_live_adapters

    pairs = make_pairs(8, seed=1)
    bundle = build_clip("clip-tiny", [p.caption for p in pairs])
    base_total = sum(p.numel() for p in bundle.model.parameters())
    peft_model, inputs, before = lora_with_live_adapters(bundle, pairs)
    trainable, _total = trainable_parameters(peft_model)
    assert 0 < trainable < base_total // 4
    with torch.no_grad():
        merged = merge_lora(peft_model)
        after = merged(**inputs)
    assert type(merged).__name__ == "CLIPModel"
    torch.testing.assert_close(before.image_embeds, after.image_embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(before.text_embeds, after.text_embeds, atol=1e-5, rtol=1e-4)


def test_unknown_lora_target_is_a_clear_error():
    bundle = build_clip("clip-tiny", ["a red circle"])
    with pytest.raises(VlforgeError, match="q_proj"):
        check_targets(bundle.model, ["query"])


def _global_loss_rank(rank: int, world: int, store_path: str, img, txt, out_dir: str) -> None:
    import torch.distributed as dist

    from models.clip import global_clip_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        b = img.shape[0] // world
        mine_img = img[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        mine_txt = txt[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss = global_clip_loss(mine_img, mine_txt, torch.tensor(2.0))
        loss.backward()
        torch.save(
            {"loss": loss.detach(), "img": mine_img.grad, "txt": mine_txt.grad}, f"{out_dir}/{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_global_loss_on_two_gloo_workers_equals_the_loss_of_the_whole_batch(tmp_path):
    """Each worker's embeddings are negatives for the other's: the value is the whole-batch loss, and each
    worker's gradient is the whole-batch gradient of its own rows."""
    import torch.multiprocessing as mp

    from models.clip import clip_loss, global_clip_loss

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(8, 16), dim=-1)
    full_img, full_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    full = clip_loss(full_img, full_txt, torch.tensor(2.0))
    full.backward()
    local_only = clip_loss(img[:4], txt[:4], torch.tensor(2.0))  # what a per-worker loss would see

    mp.spawn(
        _global_loss_rank,
        args=(2, str(tmp_path / "store"), img, txt, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["loss"], full.detach())
        torch.testing.assert_close(got["img"], full_img.grad[rank * 4 : (rank + 1) * 4])
        torch.testing.assert_close(got["txt"], full_txt.grad[rank * 4 : (rank + 1) * 4])
    assert not torch.isclose(local_only, full.detach())  # the gathered negatives change the loss
    # One worker, no process group: the plain loss.
    torch.testing.assert_close(global_clip_loss(img, txt, torch.tensor(2.0)), full.detach())


@pytest.mark.slow
@pytest.mark.parametrize("budget", [4 * 2**30, 1], ids=["materialised", "streamed"])
def test_train_dataset_yields_every_train_row_materialised_or_streamed(
    settings, tmp_path, monkeypatch, request, budget
):
    """Within the budget the decoded tensors are kept across epochs; above it (a web-scale version) the same
    rows stream, decoded again each epoch."""
    import tasks.train.data as data
    from tasks.train.data import count_train_rows, train_dataset
    from tests.helpers import publish_pairs

    request.getfixturevalue("ray_local")
    monkeypatch.setattr(data, "MATERIALIZE_BYTES", budget)
    pairs = make_pairs(60, seed=8)
    dv = publish_pairs(settings, "stream", pairs, files=2)
    model = build_clip("clip-tiny", [p.caption for p in pairs]).save(str(tmp_path / "init"))
    ds = train_dataset(dv, model, eval_fraction=0.2, augment=False).ray_dataset()
    assert data.version_rows(dv) == 60 and data.clip_row_bytes(model) == 3 * 32 * 32 * 4 + 2 * 32 * 8
    for _ in range(2):  # two epochs
        rows = sum(len(b["input_ids"]) for b in ds.iter_batches(batch_size=16, batch_format="numpy"))
        assert rows == count_train_rows(dv, 0.2)


def test_content_split_puts_the_same_image_on_the_same_side_whatever_its_key_batch_or_source():
    """The split reads the image, not the row's key: the same image under other keys (another raw batch,
    another source) and a re-encoded copy of it fall on the same side, and a stored phash column gives the
    same answer as hashing the bytes."""
    import io

    import pyarrow as pa
    from PIL import Image

    from vlforge.demo.synth import photo_like
    from vlforge.imagehash import phash_bytes

    images = photo_like(60, seed=5)
    copies = []
    for b in images:
        buf = io.BytesIO()
        Image.open(io.BytesIO(b)).convert("RGB").save(buf, format="JPEG", quality=75)
        copies.append(buf.getvalue())
    table = pa.table({"key": [f"00000{i:04d}" for i in range(60)], "image": images})
    other_keys = pa.table({"key": [f"batch2-{i}" for i in range(60)], "image": images})
    reencoded = pa.table({"key": [f"src-{i}" for i in range(60)], "image": copies})
    stored = pa.table({"key": table.column("key"), "phash": [phash_bytes(b) for b in images]})
    mask = content_eval_mask(table, 0.5)
    assert 10 < mask.sum() < 50  # a split, not all on one side
    assert (content_eval_mask(other_keys, 0.5) == mask).all()
    assert (content_eval_mask(stored, 0.5) == mask).all()
    assert (content_eval_mask(reencoded, 0.5) == mask).mean() >= 0.85  # BENCHMARKS: ~0.9 for JPEG copies
    assert not (
        eval_mask(other_keys.column("key").to_pylist(), 0.5)
        == eval_mask(table.column("key").to_pylist(), 0.5)
    ).all()


@pytest.mark.slow
def test_a_small_version_decoded_by_the_driver_gives_ray_train_the_same_rows(settings, tmp_path, request):
    """Below ``driver_decode_rows`` the driver decodes the version and hands Ray Data the tensors: every train
    row once an epoch, the same rows as Ray Data's own decode, a new order each epoch drawn from the seed."""
    from tasks.train.data import count_train_rows, train_dataset
    from tests.helpers import publish_pairs

    request.getfixturevalue("ray_local")
    pairs = make_pairs(80, seed=9)
    dv = publish_pairs(settings, "small", pairs, files=4)
    model = build_clip("clip-tiny", [p.caption for p in pairs]).save(str(tmp_path / "init"))

    plans = {}

    def epochs(driver_rows: int, seed: int = 0) -> list[list[tuple]]:
        pipeline = train_dataset(dv, model, eval_fraction=0.2, augment=False, seed=seed)
        ds = pipeline.ray_dataset(driver_rows=driver_rows)
        rows = [
            [
                tuple(ids)
                for b in ds.iter_batches(batch_size=16, batch_format="numpy")
                for ids in b["input_ids"]
            ]
            for _ in range(2)
        ]
        plans[driver_rows] = ds.stats()  # the operators that ran, the parent's decode included
        return rows

    from_driver, from_ray_data = epochs(driver_rows=80), epochs(driver_rows=0)
    # Ray Data read the files itself only when asked to (its readers list and read them).
    assert "FromBlocks" in plans[80] and "ReadFiles" not in plans[80], plans[80]
    assert "ReadFiles" in plans[0] and "FromBlocks" not in plans[0], plans[0]
    assert len(from_driver[0]) == count_train_rows(dv, 0.2) > 0
    for mine, theirs in zip(from_driver, from_ray_data, strict=True):
        assert sorted(mine) == sorted(theirs)  # every train row once an epoch, as Ray Data decodes them
    assert from_driver[0] != from_driver[1]  # a new block order in the second epoch
    assert epochs(driver_rows=80) == from_driver  # drawn from the seed: the same in another run
