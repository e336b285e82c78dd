"""URL lists, the URL guard, reason normalisation and staging: no servers, nothing downloaded."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.ingest import ingest, user_agent_token
from tasks.ingest.accounting import ROW_COL, reason
from tasks.ingest.staging import interleave_by_host, stage_list
from tasks.ingest.urllists import find_list_files, read_url_list
from vlforge import netguard, raw
from vlforge.errors import UrlListError

ROWS = [
    {"url": "http://93.184.216.34/a.jpg", "caption": "a red circle", "lang": "en"},
    {"url": "http://93.184.216.34/b.jpg", "caption": "a blue square", "lang": "en"},
]


def _write(path, fmt: str, rows=ROWS) -> str:
    cols = list(rows[0])
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("\n".join([sep.join(cols)] + [sep.join(r[c] for c in cols) for r in rows]) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_every_list_format_reads_with_extra_columns(tmp_path, fmt):
    listed = read_url_list(_write(tmp_path / f"list.{fmt}", fmt))
    assert listed.table.column_names == ["url", "caption", "lang"]
    assert listed.table.column("caption").to_pylist() == ["a red circle", "a blue square"]


def test_gzipped_list_and_custom_columns(tmp_path):
    path = tmp_path / "list.csv.gz"
    path.write_bytes(gzip.compress(b"link,text\nhttp://93.184.216.34/a.jpg,hello\n"))
    listed = read_url_list(str(path), url_col="link", caption_col="text")
    assert listed.table.to_pylist() == [{"url": "http://93.184.216.34/a.jpg", "caption": "hello"}]


def test_missing_column_names_the_file_and_the_columns_present(tmp_path):
    path = _write(tmp_path / "list.csv", "csv")
    with pytest.raises(UrlListError) as err:
        read_url_list(path, caption_col="text")
    msg = str(err.value)
    assert path in msg and "'text'" in msg and "url, caption, lang" in msg


@pytest.mark.parametrize(
    "name,content,problem",
    [
        ("empty.csv", b"url,caption\n", "empty"),
        ("broken.parquet", b"PAR1 not really parquet", "cannot be read"),
        ("bad.json", b"{not json", "cannot be read"),
        ("list.xlsx", b"whatever", "unknown format"),
    ],
)
def test_unreadable_or_empty_lists_fail_with_one_clear_error(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UrlListError, match=problem) as err:
        read_url_list(str(path))
    assert str(path) in str(err.value)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(UrlListError, match="no such file"):
        find_list_files(str(tmp_path / "nope.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UrlListError, match="no list files"):
        find_list_files(str(tmp_path / "empty"))


def test_a_bad_list_in_a_folder_stops_everything_before_any_download(settings, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    _write(lists / "a_good.csv", "csv")
    (lists / "b_bad.csv").write_text("link,caption\nhttp://x/a.jpg,hi\n")
    with pytest.raises(UrlListError, match="b_bad.csv"):
        ingest(str(lists), "web", settings)
    assert raw.list_raw_batches(settings, "web") == []


@pytest.mark.parametrize(
    "status,message,expected",
    [
        ("success", None, "success"),
        ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
        ("failed_to_download", "<urlopen error timed out>", "timeout"),
        ("failed_to_download", "The read operation timed out", "timeout"),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns_error"),
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "opted_out"),
        ("failed_to_resize", "Image decoding error", "undecodable_image"),
        ("failed_to_resize", "image too small", "too_small"),
        ("failed_to_resize", "image area too large", "decompression_bomb"),
        (
            "failed_to_resize",
            "error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS",
            "decompression_bomb",
        ),
        (
            "failed_to_resize",
            "error: (-215:Assertion failed) !buf.empty() in function 'imdecode_'",
            "empty_body",
        ),
        ("failed_to_download", "refused by vlforge: bad_scheme: unsupported scheme 'ftp'", "bad_scheme"),
    ],
)
def test_error_messages_normalise_to_reasons(status, message, expected):
    assert reason(status, message) == expected


@pytest.mark.parametrize(
    "url,refusal",
    [
        ("https://example.com/a.jpg", None),
        ("ftp://example.com/a.jpg", "bad_scheme"),
        ("file:///etc/passwd", "bad_scheme"),
        ("javascript:alert(1)", "bad_scheme"),
        ("example.com/a.jpg", "bad_scheme"),
        ("http://", "malformed_url"),
        ("http://exa mple.com/a.jpg", "malformed_url"),
        ("http://example.com:99999/a.jpg", "malformed_url"),
        (None, "malformed_url"),
        ("", "malformed_url"),
    ],
)
def test_url_shape_checks(url, refusal):
    _, got = netguard.parse_host(url)
    assert (got.reason if got else None) == refusal


@pytest.mark.parametrize(
    "host,refused",
    [
        ("10.1.2.3", True),
        ("192.168.0.1", True),
        ("127.0.0.1", True),
        ("169.254.169.254", True),  # cloud metadata
        ("::1", True),
        ("fe80::1", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", True),
        ("localhost", True),
        ("93.184.216.34", False),
        ("2606:2800:220:1:248:1893:25c8:1946", False),
    ],
)
def test_private_loopback_and_link_local_hosts_are_refused(host, refused):
    assert (netguard.host_refusal(host) is not None) == refused


def test_interleave_takes_hosts_in_turn():
    hosts = ["a", "a", "a", "b", "b", "c"]
    assert [hosts[i] for i in interleave_by_host(hosts)] == ["a", "b", "c", "a", "b", "a"]


def test_staging_numbers_rows_refuses_with_reasons_and_interleaves(tmp_path):
    rows = [
        {"url": "http://93.184.216.34/1.jpg", "caption": "x", "key": "k0"},
        {"url": "http://93.184.216.34/2.jpg", "caption": "x", "key": "k1"},
        {"url": "http://10.0.0.7/secret.jpg", "caption": "x", "key": "k2"},
        {"url": "http://93.184.216.35/3.jpg", "caption": "x", "key": "k3"},
        {"url": "gopher://93.184.216.34/", "caption": "x", "key": "k4"},
    ]
    path = _write(tmp_path / "list.parquet", "parquet", rows)
    staged = stage_list(path, str(tmp_path / "stage"), "url", "caption", netguard.NetworkPolicy())
    assert (staged.rows, staged.allowed) == (5, 3)
    assert staged.extra_columns == ["list_key", ROW_COL]  # img2dataset reserves "key"
    allowed = pq.read_table(staged.input_uri).to_pylist()
    assert [r[ROW_COL] for r in allowed] == [0, 3, 1]  # hosts take turns
    refused = pq.read_table(staged.refused_uri).to_pylist()
    assert [(r[ROW_COL], reason("failed_to_download", r["error_message"])) for r in refused] == [
        (2, "private_network"),
        (4, "bad_scheme"),
    ]


def test_user_agent_token_names_vlforge():
    assert user_agent_token("vlforge/0.1 (+https://github.com/vlforge/vlforge)") == "vlforge"
    assert user_agent_token("MyCrawler") == "mycrawler"


def test_a_csv_row_longer_than_the_read_block_is_read_not_refused(tmp_path):
    # A 3.5 MB caption cell is more than pyarrow's 1 MiB csv block: the list is read again with larger blocks.
    path = tmp_path / "big.csv"
    rows = [f"http://a.example/{i}.jpg,a red circle" for i in range(5)]
    rows.insert(3, "http://a.example/big.jpg," + "x" * 3_500_000)
    path.write_text("url,caption\n" + "\n".join(rows) + "\n")
    table = read_url_list(str(path)).table
    assert table.num_rows == 6
    assert [len(c) for c in table.column("caption").to_pylist()] == [12, 12, 12, 3_500_000, 12, 12]
