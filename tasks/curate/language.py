"""A dependency-free caption-language guess for the optional language filter.

Script first (CJK, Cyrillic, Arabic, ...), then stop-word overlap for common Latin-script languages. It answers
``"und"`` (undetermined) when unsure, and the filter keeps those rows: it drops only captions that are clearly
in another language. For production-grade detection plug in fastText's lid.176 the same way.
"""

from __future__ import annotations

import re

_STOPWORDS = {
    "en": [
        "a",
        "an",
        "the",
        "of",
        "and",
        "on",
        "in",
        "with",
        "at",
        "to",
        "for",
        "is",
        "are",
        "this",
        "that",
        "from",
        "by",
        "its",
        "his",
        "her",
        "their",
        "white",
        "black",
    ],
    "de": [
        "der",
        "die",
        "das",
        "und",
        "ein",
        "eine",
        "mit",
        "auf",
        "im",
        "ist",
        "nicht",
        "von",
        "zu",
        "den",
        "dem",
        "des",
        "auch",
        "sich",
        "weiß",
        "schwarz",
    ],
    "fr": [
        "le",
        "la",
        "les",
        "un",
        "une",
        "des",
        "et",
        "sur",
        "avec",
        "dans",
        "est",
        "du",
        "au",
        "aux",
        "pour",
        "par",
        "qui",
        "blanc",
        "noir",
    ],
    "es": [
        "el",
        "la",
        "los",
        "las",
        "un",
        "una",
        "unos",
        "y",
        "con",
        "sobre",
        "en",
        "es",
        "del",
        "al",
        "por",
        "para",
        "que",
        "blanco",
        "negro",
    ],
    "it": [
        "il",
        "lo",
        "la",
        "gli",
        "le",
        "un",
        "una",
        "e",
        "con",
        "su",
        "nel",
        "della",
        "di",
        "per",
        "che",
        "bianco",
        "nero",
    ],
    "nl": ["de", "het", "een", "en", "met", "op", "in", "is", "van", "voor", "dat", "wit", "zwart"],
    "pt": [
        "o",
        "a",
        "os",
        "as",
        "um",
        "uma",
        "e",
        "com",
        "sobre",
        "em",
        "no",
        "na",
        "do",
        "da",
        "para",
        "que",
        "branco",
        "preto",
    ],
}
_SCRIPTS = [
    ("zh", re.compile(r"[\u4e00-\u9fff]")),
    ("ja", re.compile(r"[\u3040-\u30ff]")),
    ("ko", re.compile(r"[\uac00-\ud7af]")),
    ("ru", re.compile(r"[\u0400-\u04ff]")),
    ("ar", re.compile(r"[\u0600-\u06ff]")),
    ("el", re.compile(r"[\u0370-\u03ff]")),
    ("he", re.compile(r"[\u0590-\u05ff]")),
    ("hi", re.compile(r"[\u0900-\u097f]")),
    ("th", re.compile(r"[\u0e00-\u0e7f]")),
]
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
# The ISO 639-1 codes this detector can answer: a language filter naming any other would drop every caption.
SUPPORTED_LANGUAGES = tuple(sorted({*_STOPWORDS, *(code for code, _ in _SCRIPTS)}))


def detect_language(text: str) -> str:
    """An ISO 639-1 code, or ``"und"`` when the caption does not say clearly."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "und"
    for code, pattern in _SCRIPTS:
        if len(pattern.findall(text)) * 2 >= len(letters):
            return "ja" if code == "zh" and _SCRIPTS[1][1].search(text) else code
    words = [w.lower() for w in _WORD.findall(text)]
    hits = {code: sum(w in set(sw) for w in words) for code, sw in _STOPWORDS.items()}
    ranked = sorted(hits.items(), key=lambda kv: -kv[1])
    (best, n1), (_, n2) = ranked[0], ranked[1]
    # Need some evidence and a clear margin; short captions often share words across languages.
    return best if n1 >= 2 and n1 > n2 else "und"
