"""The caption-language guess of the optional language filter: lingua (``lingua-language-detector``; its n-gram
models ship inside the wheel, so nothing is downloaded), restricted to :data:`SUPPORTED_LANGUAGES`.

It answers ``"und"`` (undetermined) when unsure, and the filter keeps those rows: it drops only captions that
are clearly in another language. "Unsure" is lingua's minimum relative distance: the best language must beat the
runner-up by :data:`MIN_RELATIVE_DISTANCE`, or there is no answer; short captions often fit several languages.

Why these choices (figures in BENCHMARKS.md "Caption language", from bench/language.py): lingua's high-accuracy
mode over the supported languages answers far more captions right than the stop-word lists it replaced and, at
this distance, none wrong on the benchmark's captions; its low-accuracy mode answers wrong ones, which the filter
would drop. Over all 75 of lingua's languages it needs several times the memory and start-up, and more languages
to confuse a short caption with. fastText's lid.176 would need weights we cannot download.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

# The ISO 639-1 codes the filter accepts (``--language``): the detector tells only these apart, so a language
# filter naming any other would drop every caption.
SUPPORTED_LANGUAGES = (
    "ar", "de", "el", "en", "es", "fr", "he", "hi", "it", "ja", "ko", "nl", "pt", "ru", "th", "zh",
)  # fmt: skip
MIN_RELATIVE_DISTANCE = 0.25
UNDETERMINED = "und"


@functools.cache
def _detector():
    """Built once per process (a few seconds; the models take a few hundred MB)."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    codes = [getattr(IsoCode639_1, code.upper()) for code in SUPPORTED_LANGUAGES]
    builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
    return builder.with_minimum_relative_distance(MIN_RELATIVE_DISTANCE).build()


def detect_languages(texts: Sequence[str]) -> list[str]:
    """An ISO 639-1 code per text, or ``"und"`` when the text does not say clearly (or has no letters)."""
    texts = list(texts)
    out = [UNDETERMINED] * len(texts)
    todo = [i for i, t in enumerate(texts) if any(c.isalpha() for c in t)]
    found = _detector().detect_languages_in_parallel_of([texts[i] for i in todo]) if todo else []
    for i, language in zip(todo, found, strict=True):
        if language is not None:
            out[i] = language.iso_code_639_1.name.lower()
    return out


def detect_language(text: str) -> str:
    """:func:`detect_languages` of one text."""
    return detect_languages([text])[0]
