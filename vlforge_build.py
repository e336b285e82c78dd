"""vlforge's build backend: setuptools' own, with one switch for the wheel's layout.

A wheel (and the metadata pip reads before building it) gets ``models``, ``tasks`` and ``flows`` under the
``vlforge`` package (setup.py says how); an editable install (``pip install -e``, as ``make install`` and CI
do) keeps the repository's top-level folders importable as they are, and an sdist holds the repository as
it is (a wheel built from it moves the packages then). The switch is an environment variable because
setuptools runs setup.py in this process.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (the hooks this module does not change)

WHEEL_LAYOUT = "VLFORGE_WHEEL_LAYOUT"  # set here, read by setup.py (which imports the name from here)


def _in_wheel_layout(hook: Callable) -> Callable:
    def run(*args, **kwargs):
        os.environ[WHEEL_LAYOUT] = "1"
        try:
            return hook(*args, **kwargs)
        finally:
            os.environ.pop(WHEEL_LAYOUT, None)

    return run


build_wheel = _in_wheel_layout(_setuptools.build_wheel)
prepare_metadata_for_build_wheel = _in_wheel_layout(_setuptools.prepare_metadata_for_build_wheel)
