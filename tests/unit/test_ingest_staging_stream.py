"""Staging streams a URL list in bounded batches: any batch size stages the same rows in the same order, every row
is accounted for, hosts take turns over the whole list, and column types that change mid-file are widened."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.ingest.accounting import ROW_COL, reason
from tasks.ingest.staging import input_parts, interleave_by_host, load_staged, stage_list
from tasks.ingest.urllists import read_url_list
from vlforge import netguard

HOSTS = ["93.184.216.34", "93.184.216.35:8080", "93.184.216.36", "[2606:2800:220:1:248:1893:25c8:1946]"]


def _refusal(i: int) -> str | None:
    """Which rows the synthetic list makes refused, and why."""
    if i % 17 == 5:
        return "private_network"
    if i % 23 == 7:
        return "bad_scheme"
    if i % 29 == 11:
        return "malformed_url"
    return None


def _rows(n: int) -> list[dict]:
    """Skewed hosts in runs (the first host owns long stretches), with refused rows sprinkled in."""
    bad = {
        "private_network": "http://10.0.0.9/private.jpg",
        "bad_scheme": "ftp://93.184.216.34/a.jpg",
        "malformed_url": "http://exa mple.com/a.jpg",
    }
    rows = []
    for i in range(n):
        host = HOSTS[0] if (i // 10) % 2 == 0 else HOSTS[1 + i % 3]
        url = bad.get(_refusal(i), f"http://{host}/img/{i}.jpg")
        rows.append({"url": url, "caption": f"photo {i}", "key": f"k{i}", "n": i})
    return rows


def _stage(path: str, where, batch_rows: int):
    staged = stage_list(path, str(where), "url", "caption", netguard.NetworkPolicy(), batch_rows=batch_rows)
    return staged, pq.read_table(staged.input_uri), pq.read_table(staged.refused_uri)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_tiny_batches_stage_the_same_rows_in_the_same_order_as_one_batch(tmp_path, fmt):
    rows = _rows(150)  # batch size 1: 150 sorted runs
    path = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = [f"{r['url']},{r['caption']},{r['key']},{r['n']}" for r in rows]
        lines.insert(40, "http://93.184.216.34/x.jpg,an,unsplittable,row,here")
        path.write_text("url,caption,key,n\n" + "\n".join(lines) + "\n")
    whole, whole_input, whole_refused = _stage(str(path), tmp_path / "whole", batch_rows=1_000_000)
    tiny, tiny_input, tiny_refused = _stage(str(path), tmp_path / "tiny", batch_rows=1)
    assert (tiny.rows, tiny.allowed, tiny.extra_columns) == (whole.rows, whole.allowed, whole.extra_columns)
    assert tiny_input.equals(whole_input) and tiny_refused.equals(whole_refused)
    unsplittable = 1 if fmt == "csv" else 0
    assert whole.rows == len(rows) + unsplittable
    ids = tiny_input.column(ROW_COL).to_pylist() + tiny_refused.column(ROW_COL).to_pylist()
    assert sorted(ids) == list(range(whole.rows))  # every row exactly once, allowed or refused
    refused_reasons = Counter(
        reason("failed_to_download", m) for m in tiny_refused.column("error_message").to_pylist()
    )
    expected = Counter(r for r in map(_refusal, range(len(rows))) if r) + Counter(
        {"malformed_row": unsplittable}
    )
    assert refused_reasons == expected
    assert tiny_refused.column(ROW_COL).to_pylist() == sorted(tiny_refused.column(ROW_COL).to_pylist())
    again = load_staged(str(tmp_path / "tiny"))  # a resumed run reuses the staged files as they are
    assert (again.rows, again.allowed, again.extra_columns) == (tiny.rows, tiny.allowed, tiny.extra_columns)


def test_hosts_take_turns_over_the_whole_list_not_per_batch(tmp_path):
    rows = _rows(150)
    path = tmp_path / "list.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    _, staged_input, _ = _stage(str(path), tmp_path / "stage", batch_rows=7)
    urls = staged_input.column("url").to_pylist()
    hosts = [u.split("/")[2] for u in urls]
    turns, seen = [], Counter()
    for h in hosts:
        turns.append(seen[h])
        seen[h] += 1
    assert turns == sorted(turns)  # round robin: every host's k-th row comes before any host's (k+1)-th
    first_seen = list(dict.fromkeys(hosts))
    assert (
        hosts[: len(first_seen)] == first_seen == list(dict.fromkeys(u.split("/")[2] for u in _allowed(rows)))
    )
    in_list_order = sorted(staged_input.column(ROW_COL).to_pylist())
    list_hosts = [rows[i]["url"].split("/")[2] for i in in_list_order]
    expected = [in_list_order[i] for i in interleave_by_host(list_hosts)]
    assert staged_input.column(ROW_COL).to_pylist() == expected  # the whole-list order, exactly


def _allowed(rows: list[dict]) -> list[str]:
    return [r["url"] for i, r in enumerate(rows) if _refusal(i) is None]


def test_a_csv_column_whose_type_changes_after_the_first_block_is_widened(tmp_path):
    n = 40_000  # about 1.5 MB: more than pyarrow's 1 MiB csv block, where the types are inferred
    lines = [f"http://93.184.216.34/{i}.jpg,photo {i},{i}" for i in range(n)] + [
        "http://93.184.216.34/z.jpg,z,abc"
    ]
    path = tmp_path / "list.csv"
    path.write_text("url,caption,size\n" + "\n".join(lines) + "\n")
    listed = read_url_list(str(path))
    assert listed.table.schema.field("size").type == pa.string()
    assert listed.table.column("size").to_pylist()[-2:] == [str(n - 1), "abc"]
    staged, staged_input, _ = _stage(str(path), tmp_path / "stage", batch_rows=5_000)
    assert staged.rows == staged.allowed == n + 1


def test_a_json_lines_column_that_widens_in_a_later_batch(tmp_path):
    path = tmp_path / "list.jsonl"
    rows = [{"url": f"http://93.184.216.34/{i}.jpg", "caption": "c", "score": i} for i in range(4)]
    rows += [{"url": "http://93.184.216.34/x.jpg", "caption": "c", "score": 0.5, "lang": "en"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    staged, staged_input, _ = _stage(str(path), tmp_path / "stage", batch_rows=2)
    assert staged.rows == staged.allowed == 5
    assert staged_input.schema.field("score").type == pa.float64()
    by_row = {r[ROW_COL]: r for r in staged_input.to_pylist()}
    assert [by_row[i]["score"] for i in range(5)] == [0, 1, 2, 3, 0.5]
    assert [by_row[i]["lang"] for i in range(5)] == [None] * 4 + ["en"]


def test_img2dataset_gets_the_staged_rows_as_parts_of_whole_shards(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(150)), path)
    staged, staged_input, _ = _stage(str(path), tmp_path / "stage", batch_rows=7)
    folder = input_parts(staged, shard_size=4, part_rows=10)  # 10 rounds down to 8: two shards a part
    parts = sorted((tmp_path / "stage" / "input-4").glob("*.parquet"))
    assert folder == str(tmp_path / "stage" / "input-4") and len(parts) == -(-staged.allowed // 8)
    assert [pq.read_metadata(p).num_rows for p in parts[:-1]] == [8] * (len(parts) - 1)
    assert pa.concat_tables([pq.read_table(p) for p in parts]).equals(staged_input)
    parts[0].unlink()  # reused as it is once complete: a second call writes nothing
    assert input_parts(staged, shard_size=4, part_rows=10) == folder and not parts[0].exists()
