"""Caption-language detection: the curate filter's detector (``tasks.curate.language``: lingua, high accuracy, over
the supported languages) against lingua's other modes and the stop-word detector it replaced (kept below as the
baseline), on short captions whose language is known.

The captions are templated descriptions of coloured shapes (what the demo's and many web captions look like: a few
words, an article, a colour, a noun) in eight languages, plus short English captions with names and no stop word.
For each detector: the share answered right, the share left undetermined (``und``: the filter keeps those) and the
share given another language (the filter would drop those wrongly), captions per second (the ratio against the
stop words in the same run is what carries over to another machine), the time to build the detector and the
process's peak memory after using it. Each detector runs in its own subprocess, so memory is its own.

    .venv/bin/python bench/language.py [--repeat 20]
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from typing import Annotated

import typer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per language: colours, shapes, backgrounds and templates ({c} colour, {s} shape, {b} background).
VOCAB = {
    "en": (
        ["red", "green", "blue", "yellow"],
        ["circle", "square", "triangle", "cross"],
        ["white", "black"],
        ["a {c} {s} on a {b} background", "a photo of a {c} {s}", "the {c} {s} is in the middle", "{c} {s}"],
    ),
    "de": (
        ["roter", "grüner", "blauer", "gelber"],
        ["Kreis", "Würfel", "Punkt", "Stern"],
        ["weißem", "schwarzem"],
        [
            "ein {c} {s} auf {b} Hintergrund",
            "ein Foto von einem {c} {s}",
            "der {c} {s} ist in der Mitte",
            "{c} {s}",
        ],
    ),
    "fr": (
        ["rouge", "vert", "bleu", "jaune"],
        ["cercle", "carré", "triangle", "losange"],
        ["blanc", "noir"],
        ["un {s} {c} sur un fond {b}", "une photo d'un {s} {c}", "le {s} {c} est au milieu", "{s} {c}"],
    ),
    "es": (
        ["rojo", "verde", "azul", "amarillo"],
        ["círculo", "cuadrado", "triángulo", "rombo"],
        ["blanco", "negro"],
        [
            "un {s} {c} sobre un fondo {b}",
            "una foto de un {s} {c}",
            "el {s} {c} está en el centro",
            "{s} {c}",
        ],
    ),
    "it": (
        ["rosso", "verde", "blu", "giallo"],
        ["cerchio", "quadrato", "triangolo", "rombo"],
        ["bianco", "nero"],
        ["un {s} {c} su uno sfondo {b}", "una foto di un {s} {c}", "il {s} {c} è nel mezzo", "{s} {c}"],
    ),
    "nl": (
        ["rode", "groene", "blauwe", "gele"],
        ["cirkel", "vierkant", "driehoek", "ster"],
        ["witte", "zwarte"],
        [
            "een {c} {s} op een {b} achtergrond",
            "een foto van een {c} {s}",
            "de {c} {s} staat in het midden",
            "{c} {s}",
        ],
    ),
    "pt": (
        ["vermelho", "verde", "azul", "amarelo"],
        ["círculo", "quadrado", "triângulo", "losango"],
        ["branco", "preto"],
        ["um {s} {c} sobre um fundo {b}", "uma foto de um {s} {c}", "o {s} {c} está no meio", "{s} {c}"],
    ),
    "ru": (
        ["красный", "зелёный", "синий", "жёлтый"],
        ["круг", "квадрат", "треугольник", "крест"],
        ["белом", "чёрном"],
        ["{c} {s} на {b} фоне", "фотография: {c} {s}", "{c} {s} находится в центре", "{c} {s}"],
    ),
}
# English captions without a stop word or with names only: a detector should leave them undetermined or say "en".
NAMES = [
    "Fido the dog",
    "Paris skyline at night",
    "Golden Gate Bridge",
    "Mount Fuji sunrise",
    "John and Mary",
]

# The stop-word detector the filter used before lingua (tasks/curate/language.py until issue #28), kept here as the
# baseline: script first, then stop-word overlap with a margin.
STOPWORDS = {
    "en": "a an the of and on in with at to for is are this that from by its his her their white black",
    "de": "der die das und ein eine mit auf im ist nicht von zu den dem des auch sich weiß schwarz",
    "fr": "le la les un une des et sur avec dans est du au aux pour par qui blanc noir",
    "es": "el la los las un una unos y con sobre en es del al por para que blanco negro",
    "it": "il lo la gli le un una e con su nel della di per che bianco nero",
    "nl": "de het een en met op in is van voor dat wit zwart",
    "pt": "o a os as um uma e com sobre em no na do da para que branco preto",
}
SCRIPTS = [
    ("zh", r"[\u4e00-\u9fff]"), ("ja", r"[\u3040-\u30ff]"), ("ko", r"[\uac00-\ud7af]"), ("ru", r"[\u0400-\u04ff]"),
    ("ar", r"[\u0600-\u06ff]"), ("el", r"[\u0370-\u03ff]"), ("he", r"[\u0590-\u05ff]"), ("hi", r"[\u0900-\u097f]"),
    ("th", r"[\u0e00-\u0e7f]"),
]  # fmt: skip


def stopword_language(text: str) -> str:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "und"
    for code, pattern in SCRIPTS:
        if len(re.findall(pattern, text)) * 2 >= len(letters):
            return "ja" if code == "zh" and re.search(SCRIPTS[1][1], text) else code
    words = [w.lower() for w in re.findall(r"[^\W\d_]+", text)]
    hits = {code: sum(w in set(sw.split()) for w in words) for code, sw in STOPWORDS.items()}
    (best, n1), (_, n2) = sorted(hits.items(), key=lambda kv: -kv[1])[:2]
    return best if n1 >= 2 and n1 > n2 else "und"


def captions() -> list[tuple[str, str]]:
    """(caption, language) pairs; the same list on every run."""
    out: dict[str, str] = {}  # caption -> language, each caption once
    for lang, (colours, shapes, backs, templates) in VOCAB.items():
        for c, s, b, t in itertools.product(colours, shapes, backs, templates):
            out.setdefault(t.format(c=c, s=s, b=b), lang)
    return [*out.items(), *((n, "en") for n in NAMES)]


RUN = r"""
import json, resource, sys, time
kind, repeat = sys.argv[1], int(sys.argv[2])
data = json.loads(sys.stdin.read())
texts = [t for t, _ in data]
t0 = time.perf_counter()
if kind == "stopwords":
    from language import stopword_language
    detect = lambda batch: [stopword_language(t) for t in batch]
else:
    from lingua import IsoCode639_1, LanguageDetectorBuilder
    from tasks.curate.language import MIN_RELATIVE_DISTANCE, SUPPORTED_LANGUAGES
    if kind.startswith("lingua-all"):
        builder = LanguageDetectorBuilder.from_all_languages()
    else:
        codes = [getattr(IsoCode639_1, c.upper()) for c in SUPPORTED_LANGUAGES]
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
    if kind.endswith("-low"):
        builder = builder.with_low_accuracy_mode()
    detector = builder.with_minimum_relative_distance(MIN_RELATIVE_DISTANCE).with_preloaded_language_models().build()
    def detect(batch):
        found = detector.detect_languages_in_parallel_of(batch)
        return [f.iso_code_639_1.name.lower() if f is not None else "und" for f in found]
built = time.perf_counter() - t0
detect(texts)  # warm
t1 = time.perf_counter()
for _ in range(repeat):
    answers = detect(texts)
per_s = repeat * len(texts) / (time.perf_counter() - t1)
right = sum(a == lang for a, (_, lang) in zip(answers, data))
und = sum(a == "und" for a in answers)
print(json.dumps({"detector": kind, "build_s": round(built, 2), "captions_per_s": round(per_s),
    "right": round(right / len(data), 3), "undetermined": round(und / len(data), 3),
    "wrong": round((len(data) - right - und) / len(data), 3),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def main(
    repeat: Annotated[int, typer.Option(help="passes over the captions for the speed figure")] = 20,
    detectors: Annotated[str, typer.Option(help="comma-separated")] = "stopwords,lingua-supported,"
    "lingua-supported-low,lingua-all-low,lingua-all",
) -> None:
    data = json.dumps(captions())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "bench")])}
    rows = []
    for kind in detectors.split(","):
        done = subprocess.run(
            [sys.executable, "-c", RUN, kind, str(repeat)],
            input=data,
            env=env,
            text=True,
            capture_output=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{kind} failed: {done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["detector"] == "stopwords"), None)
    if base:
        for r in rows:
            print(
                f"{r['detector']}: {r['captions_per_s'] / base['captions_per_s']:.3f}x the stop words' speed"
            )
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "language.json"), "w") as fh:
        json.dump({"captions": len(captions()), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    typer.run(main)
