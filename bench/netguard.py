"""Benchmark: what the network guard costs per request. Times ``urllib.request.urlopen`` (img2dataset's client)
fetching a small image from ImageServer on loopback, with the guard off and on (127.0.0.1/32 allowed), in
alternating rounds in one process; also one redirect hop each way, and the check alone (no request).

    .venv/bin/python bench/netguard.py [--requests 2000] [--rounds 3]

Prints microseconds per request (medians over short alternating blocks) and the guard's share; writes bench/results/netguard.json.
"""

from __future__ import annotations

import statistics
import time
import urllib.request

import typer
from benchkit import machine, write_result


def _per_request_us(url: str, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
    return (time.perf_counter() - start) / n * 1e6


def _check_only_us(policy, n: int) -> float:
    from vlforge import netguard

    start = time.perf_counter()
    for _ in range(n):
        netguard.redirect_refusal("http://127.0.0.1:8000/x.jpg", policy)
    return (time.perf_counter() - start) / n * 1e6


def main(
    requests: int = 2000,
    rounds: int = 3,
) -> None:
    from vlforge import netguard
    from vlforge.demo.server import ImageServer, Response
    from vlforge.demo.synth import make_pairs

    policy = netguard.NetworkPolicy.of(False, ["127.0.0.1/32"])
    image = make_pairs(1, seed=0)[0].image
    timings: dict[str, list[float]] = {k: [] for k in ("off", "on", "redirect_off", "redirect_on")}
    with ImageServer() as server:
        url = server.add("/x.jpg", Response(image))

        def redirect(handler):
            handler.send_response(302)
            handler.send_header("Location", url)
            handler.end_headers()

        hop = server.add("/hop", redirect)
        _per_request_us(url, 50)  # warm up
        block = max(10, requests // 20)  # short alternating blocks: a busy machine drifts between them
        for _ in range(rounds * 20):
            timings["off"].append(_per_request_us(url, block))
            timings["redirect_off"].append(_per_request_us(hop, block // 2))
            with netguard.guarded(policy):
                timings["on"].append(_per_request_us(url, block))
                timings["redirect_on"].append(_per_request_us(hop, block // 2))
    pairs = zip(timings["on"], timings["off"], strict=True)
    paired = statistics.median(on - off for on, off in pairs)
    result = {k: statistics.median(v) for k, v in timings.items()}
    result["check_only_us"] = _check_only_us(policy, requests * 10)
    result["image_bytes"] = len(image)
    result["guard_us_per_request"] = paired  # median of the block-by-block differences
    result["guard_us_per_redirected_request"] = result["redirect_on"] - result["redirect_off"]
    print(
        f"urlopen of a {len(image)}-byte image on loopback, median of {len(timings['on'])} alternating blocks:"
    )
    print(
        f"  guard off: {result['off']:.0f} us/request    guard on: {result['on']:.0f} us/request    "
        f"(+{result['guard_us_per_request']:.0f} us, {result['guard_us_per_request'] / result['off']:+.1%})"
    )
    print(
        f"  with one redirect: off {result['redirect_off']:.0f} us, on {result['redirect_on']:.0f} us "
        f"(+{result['guard_us_per_redirected_request']:.0f} us)"
    )
    print(f"  the check of one URL alone (parse + policy, IP literal): {result['check_only_us']:.1f} us")
    result["machine"] = machine()
    write_result("netguard.json", result)


if __name__ == "__main__":
    typer.run(main)
