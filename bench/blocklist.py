"""Benchmark: the PDQ blocklist lookup per downloaded image, the plain scan of every listed hash (``nearest`` on
the (N, 4) array, and as ``HashIndex`` runs it below its cutoff, on contiguous word columns) against the
multi-index (`tasks.ingest.blocklist.HashIndex`), at list sizes up to a million, on random hashes with a share of
near copies (0-40 bits flipped) among the queries; also checks that all three answer the same for every query.

    .venv/bin/python bench/blocklist.py [--sizes 10000,100000,1000000] [--queries 300] [--distance 31]

Prints milliseconds per image for each, their ratio, and the index's build time and size; writes
bench/results/blocklist.json.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import typer
from benchkit import machine, write_result

from tasks.ingest.blocklist import HashIndex, nearest


def _near_copy(rng: np.random.Generator, row: np.ndarray, flipped: int) -> np.ndarray:
    bits = np.unpackbits(row.astype(">u8").view(np.uint8))
    bits[rng.choice(256, flipped, replace=False)] ^= 1
    return np.frombuffer(np.packbits(bits).tobytes(), ">u8").astype(np.uint64)


def _per_query_ms(lookup, queries) -> tuple[float, list]:
    start = time.perf_counter()
    answers = [lookup(q) for q in queries]
    return (time.perf_counter() - start) / len(queries) * 1e3, answers


def run(size: int, queries: int, distance: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    listed = rng.integers(0, 2**64, size=(size, 4), dtype=np.uint64)
    asked = [
        _near_copy(rng, listed[rng.integers(size)], int(k)) for k in rng.integers(0, 41, size=queries // 3)
    ]
    asked += list(rng.integers(0, 2**64, size=(queries - len(asked), 4), dtype=np.uint64))
    start = time.perf_counter()
    default = HashIndex(listed, distance)  # what a run of this size gets
    built = time.perf_counter() - start

    def scan(q):
        best = nearest(listed, q)
        return best if best <= distance else None

    # the scan as HashIndex runs it: word columns contiguous
    plain = HashIndex(listed, distance, indexed=False)
    index = HashIndex(listed, distance, indexed=True)
    scan_ms, expected = _per_query_ms(scan, asked)
    plain_ms, plain_got = _per_query_ms(plain.nearest_within, asked)
    index_ms, got = _per_query_ms(index.nearest_within, asked)
    return {
        "hashes": size, "distance": distance, "queries": len(asked), "matches": sum(e is not None for e in expected),
        "same_answers": expected == got == plain_got, "scan_ms": round(scan_ms, 4),
        "plain_scan_ms": round(plain_ms, 4), "index_ms": round(index_ms, 4),
        "speedup": round(plain_ms / index_ms, 1), "build_s": round(built, 2), "indexed_by_default": default.indexed,
    }  # fmt: skip


def main(
    sizes: str = typer.Option("10000,100000,1000000", help="list sizes, comma-separated"),
    queries: int = typer.Option(300, help="images looked up per size (a third of them near copies)"),
    distance: int = typer.Option(31, help="match threshold in bits, as --blocklist-distance"),
) -> None:
    results = []
    for size in (int(s) for s in sizes.split(",")):
        r = run(size, queries, distance)
        results.append(r)
        print(
            f"{r['hashes']:>9} hashes: scan {r['scan_ms']:.3f} ms/image (contiguous columns "
            f"{r['plain_scan_ms']:.3f}), index {r['index_ms']:.3f} ms/image ({r['speedup']}x; built in "
            f"{r['build_s']} s; same answers: {r['same_answers']}; {r['matches']} matches; indexed by default: "
            f"{r['indexed_by_default']})"
        )
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss_mb:.0f} MB")
    write_result("blocklist.json", {"results": results, "peak_rss_mb": round(rss_mb), "machine": machine()})


if __name__ == "__main__":
    typer.run(main)
