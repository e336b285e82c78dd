"""Real photos are stored upright: a JPEG whose EXIF orientation says "rotate" is turned at ingest."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.ingest import ingest
from tasks.ingest.exif import UPRIGHT_KEY, upright_shard
from vlforge import raw

pytestmark = pytest.mark.integration

FAST = dict(processes=1, threads=4, timeout=5.0, retries=1, allow_private_networks=True)
ORIENTATION_TAG = 0x0112


def _upright() -> Image.Image:
    """A 64x40 landscape picture no rotation or mirror maps onto itself: a gradient and a red top-left block."""
    x = np.linspace(0, 255, 64, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, 40, dtype=np.float32)[:, None, None]
    pixels = np.concatenate(
        [np.broadcast_to(x, (40, 64, 1)), np.broadcast_to(y, (40, 64, 1)), 128 + 0 * x + 0 * y], 2
    )
    pixels[:12, :16] = (255, 0, 0)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _as_camera_stores_it(upright: Image.Image, orientation: int) -> bytes:
    """The JPEG a camera writes: pixels as the sensor saw them, plus the tag that says how to turn them."""
    sensor = {
        1: upright,
        3: upright.transpose(Image.Transpose.ROTATE_180),
        6: upright.transpose(Image.Transpose.ROTATE_90),
    }
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    buf = io.BytesIO()
    sensor[orientation].save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif().get(ORIENTATION_TAG) in (None, 1), "stored bytes still carry an orientation"
        return np.asarray(img.convert("RGB"), dtype=np.float32)


def test_exif_rotated_jpegs_are_stored_upright(settings, image_server, tmp_path):
    from vlforge.demo.server import Response

    upright = _upright()
    truth = np.asarray(upright, dtype=np.float32)
    for o in (1, 3, 6):
        image_server.add(f"/o{o}.jpg", Response(_as_camera_stores_it(upright, o)))
    lst = tmp_path / "photos.csv"
    lst.write_text(
        "url,caption\n" + "".join(f"{image_server.url(f'/o{o}.jpg')},photo {o}\n" for o in (1, 3, 6))
    )

    [result] = ingest(str(lst), "photos", settings, shard_size=10, **FAST)

    assert result.counts == {"success": 3}
    shards = raw.shard_files(result.uri)
    rows = {r["caption"]: r for s in shards for r in pq.read_table(s).to_pylist()}
    for o in (1, 3, 6):
        row = rows[f"photo {o}"]
        stored = _pixels(row["jpg"])
        assert stored.shape == truth.shape, (o, stored.shape)
        assert (row["width"], row["height"]) == (64, 40), o
        assert (row["original_width"], row["original_height"]) == (64, 40), o
        # JPEG re-encoding moves pixels by a few levels; a wrong turn moves them by ~100.
        assert np.abs(stored - truth).mean() < 8, o
        assert stored[:12, :16, 0].mean() > 200 and stored[:12, :16, 1].mean() < 60, o
    # img2dataset's exif column stays as the evidence.
    assert json.loads(rows["photo 6"]["exif"])["Image Orientation"] == "Rotated 90 CW"
    assert json.loads(rows["photo 3"]["exif"])["Image Orientation"] == "Rotated 180"
    # The rewritten shard is marked: a second pass (a resumed run) turns nothing twice.
    marked = [s for s in shards if UPRIGHT_KEY in (pq.read_schema(s).metadata or {})]
    assert len(marked) == 1
    assert upright_shard(marked[0]) == 0
    again = {r["caption"]: r for r in pq.read_table(marked[0]).to_pylist()}
    assert again["photo 6"]["jpg"] == rows["photo 6"]["jpg"]
