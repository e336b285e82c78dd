"""What the benches share: where a result is written, and the machine it was measured on.

A bench runs as ``python bench/NAME.py``, so this folder is first on ``sys.path`` and ``import benchkit``
finds this module; the product is imported from the repository root, which each bench puts on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import platform

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    """The figures BENCHMARKS.md quotes beside a result: cores, load when it ended, platform."""
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "platform": platform.platform(),
    }


def write_result(name: str, result: dict) -> str:
    """Print ``result`` and write it to ``bench/results/<name>`` (ignored by git); the file's path."""
    path = os.path.join(RESULTS_DIR, name)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))
    return path
