"""The rules behind crawl compliance, without servers: opt-out list entries, tdmrep.json locations, the PDQ
blocklist file and matcher, Retry-After, which reasons are transient, and the per-host gate's arithmetic."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tasks.ingest.accounting import is_transient, reason
from tasks.ingest.blocklist import HashIndex, hash_hex, nearest, parse_blocklist, pdq_hash
from tasks.ingest.fetch import retry_after_seconds
from tasks.ingest.optout import load_opt_out_lists
from tasks.ingest.politeness import HostGate
from tasks.ingest.robots import parse_tdmrep, tdm_reserved
from vlforge.errors import VlforgeError


def test_opt_out_domains_cover_subdomains_and_prefixes_cover_paths(tmp_path):
    path = tmp_path / "optout.txt"
    path.write_text("# comment\nExample.com\n*.photos.net # trailing comment\n\nhttps://Site.org/gallery/\n")
    lists = load_opt_out_lists([str(path)])
    assert len(lists.digests[str(path)]) == 64

    def refused(url: str) -> bool:
        from vlforge.netguard import parse_host

        return lists.refusal(url, parse_host(url)[0]) is not None

    assert refused("http://example.com/a.jpg") and refused("https://img.cdn.example.com/a.jpg")
    assert refused("http://photos.net/x") and refused("http://a.photos.net/x")
    assert not refused("http://notexample.com/a.jpg") and not refused("http://example.com.evil.io/a.jpg")
    assert refused("https://site.org/gallery/1.jpg") and refused("HTTPS://SITE.ORG/gallery/2.jpg")
    assert not refused("https://site.org/public/1.jpg") and not refused("http://site.org/gallery/1.jpg")
    assert lists.refusal("http://example.com/a.jpg", "example.com").startswith("opted_out: ")


def test_opt_out_list_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(VlforgeError, match="no such file"):
        load_opt_out_lists([str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.txt"
    bad.write_text("example.com\nftp://files.example.com/\n")
    with pytest.raises(VlforgeError, match="bad.txt line 2"):
        load_opt_out_lists([str(bad)])


def test_tdmrep_first_matching_location_decides():
    rules = parse_tdmrep(
        b'[{"location": "/news/free/*", "tdm-reservation": 0},'
        b' {"location": "/news/*", "tdm-reservation": 1},'
        b' {"location": "/exact.jpg$", "tdm-reservation": 1}]'
    )
    assert tdm_reserved(rules, "/news/2026/a.jpg")
    assert not tdm_reserved(rules, "/news/free/a.jpg")
    assert tdm_reserved(rules, "/exact.jpg") and not tdm_reserved(rules, "/exact.jpg.html")
    assert not tdm_reserved(rules, "/other/a.jpg")
    assert parse_tdmrep(b"not json") == [] and parse_tdmrep(b'{"location": "/"}') == []


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    return small.resize((1024, 768), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(4))


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_pdq_of_a_reduced_decode_matches_resized_and_reencoded_copies_not_other_images(tmp_path):
    import pdqhash

    original = _jpeg(_photo(0), 92)
    hashed = pdq_hash(original)
    full_bits, _ = pdqhash.compute(np.asarray(Image.open(io.BytesIO(original)).convert("RGB")))
    full = np.frombuffer(np.packbits(full_bits.astype(np.uint8)).tobytes(), ">u8").astype(np.uint64)
    assert nearest(full[None], hashed) <= 16  # the draft-mode decode hashes like the full-size one
    copy = pdq_hash(_jpeg(_photo(0).resize((400, 300)), 55))
    assert nearest(hashed[None], copy) <= 31
    assert nearest(hashed[None], pdq_hash(_jpeg(_photo(1), 92))) > 60
    assert pdq_hash(b"not an image") is None

    path = tmp_path / "pdq.txt"
    path.write_text(f"# list\n{hash_hex(hashed)},100,extra\n{hash_hex(full).upper()}\n")
    hashes, digest = parse_blocklist(str(path))
    assert hashes.shape == (2, 4) and len(digest) == 64 and nearest(hashes, hashed) == 0
    path.write_text("abc123\n")
    with pytest.raises(VlforgeError, match="line 1"):
        parse_blocklist(str(path))


@pytest.mark.parametrize("distance", [0, 31, 40, 60])
def test_the_blocklist_index_finds_exactly_what_the_full_scan_finds(distance):
    rng = np.random.default_rng(distance)
    listed = rng.integers(0, 2**64, size=(HashIndex._INDEXED, 4), dtype=np.uint64)  # shortest indexed
    index = HashIndex(listed, distance)
    assert index.indexed == (distance <= 47)

    def near_copy(row: np.ndarray, flipped: int) -> np.ndarray:
        bits = np.unpackbits(row.astype(">u8").view(np.uint8))
        bits[rng.choice(256, flipped, replace=False)] ^= 1
        return np.frombuffer(np.packbits(bits).tobytes(), ">u8").astype(np.uint64)

    queries = [near_copy(listed[rng.integers(len(listed))], int(k)) for k in rng.integers(0, 64, size=150)]
    queries += list(rng.integers(0, 2**64, size=(50, 4), dtype=np.uint64))
    found = 0
    for query in queries:
        best = nearest(listed, query)
        assert index.nearest_within(query) == (best if best <= distance else None)
        found += best <= distance
    assert found > 0


def test_the_plain_scan_is_the_smallest_hamming_distance_over_all_256_bits():
    rng = np.random.default_rng(7)
    listed = rng.integers(0, 2**64, size=(300, 4), dtype=np.uint64)
    listed[0] = ~np.uint64(0)  # all ones: 256 bits away from the all-zero query, past a uint8's range

    def bits(rows: np.ndarray) -> np.ndarray:
        return np.unpackbits(rows.astype(">u8").view(np.uint8).reshape(len(rows), 32), axis=1)

    for query in [np.zeros(4, np.uint64), *rng.integers(0, 2**64, size=(20, 4), dtype=np.uint64)]:
        expected = (bits(listed) != bits(query[None])).sum(axis=1)
        assert nearest(listed, query) == expected.min()
        for distance in (31, int(expected.min()), int(expected.min()) - 1):
            want = int(expected.min()) if expected.min() <= distance else None
            assert HashIndex(listed, distance).nearest_within(query) == want
    assert nearest(listed[:1], np.zeros(4, np.uint64)) == 256


def test_retry_after_and_transient_reasons():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_seconds(later) <= 31
    for why in (
        "timeout",
        "http_503",
        "http_500",
        "rate_limited",
        "robots_unavailable",
        "connection_refused",
    ):
        assert is_transient(why), why
    for why in ("robots_disallowed", "opted_out", "tdm_reserved", "blocklisted", "http_404", "too_small"):
        assert not is_transient(why), why
    assert reason("failed_to_download", "refused by vlforge: blocklisted: distance 4") == "blocklisted"


def test_gate_bounds_connections_and_spaces_starts_per_host():
    gate = HostGate(connections=2, rate=10.0, crawl_delays={"slow:80": 0.3})
    assert gate.try_acquire("a:80") == 0.0
    assert 0.05 < gate.try_acquire("a:80") <= 0.1  # the next start waits for the rate's interval
    assert gate.try_acquire("b:80") == 0.0  # another host is not held back
    time.sleep(0.11)
    assert gate.try_acquire("a:80") == 0.0  # second connection
    time.sleep(0.11)
    assert gate.try_acquire("a:80") > 0  # two in flight: wait for a release
    gate.release("a:80")
    assert gate.try_acquire("a:80") == 0.0
    assert gate.try_acquire("slow:80") == 0.0
    gate.release("slow:80")
    assert gate.try_acquire("slow:80") >= 0.25  # Crawl-delay counts from the end of the last request
    gate.hold("b:80", 5)
    assert gate.try_acquire("b:80") > 4  # a Retry-After holds the host back


def test_gate_hosts_beyond_the_tables_probes_share_an_entry_and_keep_their_limits():
    """Nine hosts whose keys start at the same entry: eight take their own, the ninth shares the first's, so it
    waits while the first host's one connection is in flight (never the reverse: no limit is loosened)."""
    from tasks.ingest.politeness import ENTRIES, PROBES, _key

    hosts, i = [], 0
    while len(hosts) < PROBES + 1:
        if _key(host := f"h{i}.example:80") % ENTRIES == 777:
            hosts.append(host)
        i += 1
    gate = HostGate(connections=1, rate=1000.0)
    try:
        assert [gate.try_acquire(h) for h in hosts[:PROBES]] == [0.0] * PROBES  # an entry each
        assert gate.try_acquire(hosts[PROBES]) > 0  # shares the first host's: one in flight already
        gate.release(hosts[0])
        time.sleep(0.002)  # the rate's interval (1 ms)
        assert gate.try_acquire(hosts[PROBES]) == 0.0
        assert gate.try_acquire(hosts[0]) > 0  # and now the first waits for the ninth
        assert gate.try_acquire("other.example:80") == 0.0
    finally:
        gate.close()
    assert not os.path.exists(gate.path)


def test_gate_table_of_a_killed_run_is_removed_by_the_next_run():
    """A run that ends removes its table; one killed with SIGKILL cannot, so the next run's gate removes it (its
    creator is gone) and leaves a live run's alone."""
    import subprocess
    import sys

    code = (
        "import os, signal; from tasks.ingest.politeness import HostGate; "
        "gate = HostGate(2, 5.0); print(gate.path, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    orphan = killed.stdout.strip()
    assert killed.returncode == -9 and os.path.exists(orphan), killed.stderr
    live = HostGate(1, 1.0)
    try:
        assert not os.path.exists(orphan)
        assert os.path.exists(live.path)  # this process's own, alive
        HostGate(1, 1.0).close()
        assert os.path.exists(live.path)
    finally:
        live.close()


def test_cli_compliance_options_reject_bad_input_in_one_line(settings, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    urls = tmp_path / "list.csv"
    urls.write_text("url,caption\nhttp://example.com/a.jpg,a\n")
    bad_hashes = tmp_path / "pdq.txt"
    bad_hashes.write_text("# ok\n" + "ab" * 32 + "\nnot-a-hash\n")
    cases = {
        "--opt-out-list": (str(tmp_path / "missing.txt"), "missing.txt: no such file"),
        "--blocklist": (str(bad_hashes), "pdq.txt line 3: 'not-a-hash' is not a PDQ hash"),
        "--max-connections-per-host": ("0", "--max-connections-per-host must be at least 1"),
        "--max-requests-per-host-per-s": ("0", "--max-requests-per-host-per-s must be above 0"),
    }
    for option, (value, message) in cases.items():
        result = CliRunner().invoke(app, ["ingest", str(urls), "--source", "web", option, value])
        assert result.exit_code == 2, (option, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "store" / "raw").exists()  # refused before anything was staged or fetched


def test_refresh_flow_takes_the_compliance_settings():
    import inspect

    from pydantic import ValidationError

    from flows import pipeline
    from flows.params import RefreshParams

    params = RefreshParams(
        location="l", ingest={"opt_out_lists": ["s3://b/optout.txt"], "blocklist": "pdq.txt"}
    )
    assert params.ingest.opt_out_lists == ["s3://b/optout.txt"] and not params.ingest.ignore_robots_txt
    # The first form's flat keys (saved deployment parameters) still land in the ingest settings.
    assert RefreshParams(location="l", blocklist="pdq.txt").ingest.blocklist == "pdq.txt"
    for bad in (
        {"blocklist_distance": 300},
        {"max_connections_per_host": 0},
        {"max_requests_per_host_per_s": 0},
    ):
        with pytest.raises(ValidationError):
            RefreshParams(location="l", **bad)
    source = inspect.getsource(pipeline.refresh_dataset.fn)  # the flow hands every setting to ingest
    assert "ingest_task(params.location, params.source, settings, params.ingest)" in source
