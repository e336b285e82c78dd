"""The dataset card: ``README.md`` in a version's folder, with YAML front matter the Hugging Face Hub reads.

The front matter names the licence, task categories, size category, the Parquet files (``configs``) and the
features (``dataset_info``); the body says what the version is: counts per reason, the filter settings, the
scorer, the raw batches and URL lists it came from, how they were crawled (robots.txt, opt-out lists, blocklist,
user agent), a licence summary when the source has a licence column, and how to load it. It is rendered from the manifest alone (so ``vlforge datasets NAME@VERSION --card`` can render
one for a version published before cards existed), written before the manifest and left out of the content hash.
"""

from __future__ import annotations

import json
import re

from vlforge.datasets import DatasetVersion

CARD = "README.md"
_SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
_SIZES += [(10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
_HF_DTYPES = {"float": "float32", "double": "float64", "halffloat": "float16"}
_PRIMITIVE = re.compile(r"^(u?int(8|16|32|64)|float|double|halffloat|bool|string|large_string|binary)$")
_SPDX = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


def size_category(rows: int) -> str:
    return next((label for limit, label in _SIZES if rows < limit), "n>1B")


def _features(schema: dict[str, str]) -> list[dict[str, str]]:
    """``dataset_info.features`` for the Hub: the image column and every primitive column (nested ones left
    to the Hub, which reads them from the Parquet schema)."""
    out = []
    for name, typ in schema.items():
        if name == "image" and typ.startswith("struct<bytes"):
            out.append({"name": name, "dtype": "image"})
        elif _PRIMITIVE.match(typ):
            out.append({"name": name, "dtype": _HF_DTYPES.get(typ, typ)})
    return out


def _licence(licenses: dict[str, int]) -> str:
    """The card's ``license``: the one licence every kept row shares when it is an id the Hub may know, else
    ``other`` (several, or free text) or ``unknown`` (the source has no licence column)."""
    known = {k: v for k, v in licenses.items() if k != "unknown"}
    if not licenses:
        return "unknown"
    if len(known) == 1 and len(licenses) == 1 and _SPDX.match(next(iter(known)).lower()):
        return next(iter(known)).lower()
    return "other"


def front_matter(dv: DatasetVersion) -> dict:
    m = dv.manifest
    kept = int(m.get("counts", {}).get("kept", 0))
    meta = {
        "license": _licence(m.get("licenses") or {}),
        "pretty_name": f"{dv.name} ({dv.version})",
        "task_categories": ["image-to-text", "text-to-image", "zero-shot-image-classification"],
        "size_categories": [size_category(kept)],
        "tags": ["vlforge", "image-text", "clip-filtered" if m.get("scorer") else "filtered"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
        "dataset_info": {
            "features": _features((m.get("schema") or {}).get("data") or {}),
            "splits": [{"name": "train", "num_examples": kept}],
        },
    }
    if m.get("recaption"):
        meta["tags"].append("synthetic-captions")
    if meta["license"] == "other":
        meta["license_name"] = "mixed" if len(m.get("licenses") or {}) > 1 else "see-card"
    return meta


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _lineage(m: dict) -> list[str]:
    batches = m.get("raw_batches") or []
    rows = [
        (
            f"`{b.get('batch')}`",
            f"`{b.get('uri', '')}`",
            f"`{b['url_list']}`" if b.get("url_list") else "unknown",
            b.get("ingest_run_id") or "",
        )
        for b in (x if isinstance(x, dict) else {"batch": x} for x in batches)
    ]
    return _table(("raw batch", "uri", "URL list", "ingest MLflow run"), rows)


def _compliance(m: dict) -> list[str]:
    """How each raw batch was crawled: robots.txt on or off, TDM, opt-out lists and blocklist (digests only),
    per-host limits and user agent (``tasks.ingest.stage.Compliance.record``)."""
    batches = [b for b in m.get("raw_batches") or [] if isinstance(b, dict) and b.get("compliance")]
    if not batches:
        return ["No crawl-compliance record: the raw batches predate it."]
    rows = []
    for b in batches:
        c = b["compliance"]
        lists = ", ".join(
            f"`{o['file']}` (sha256 `{o['sha256'][:16]}`)" for o in c.get("opt_out_lists") or []
        )
        block = c.get("blocklist")
        rows.append((
            f"`{b.get('batch')}`", c.get("robots_txt", "?"), c.get("tdm_reservation", "?"), lists or "none",
            f"sha256 `{block['sha256'][:16]}`, {block['hashes']} PDQ hashes, distance <= {block['max_distance']}"
            if block else "none",
            f"{c.get('max_connections_per_host')} connections, {c.get('max_requests_per_host_per_s')} requests/s",
            f"`{c.get('user_agent', '?')}`",
        ))  # fmt: skip
    header = ("raw batch", "robots.txt", "TDM reservations", "opt-out lists", "hash blocklist", "per host",
              "user agent")  # fmt: skip
    return _table(header, rows)


def _how_to_load(dv: DatasetVersion) -> list[str]:
    files = f"{dv.uri}/data/*.parquet"
    return [
        "## How to load it",
        "",
        "Hugging Face `datasets` (images decode to PIL):",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("parquet", data_files="{files}", split="train")',
        'ds[0]["image"]  # PIL.Image',
        "```",
        "",
        "WebDataset shards (open_clip's `--train-data`, `webdataset.WebDataset`):",
        "",
        "```bash",
        f"vlforge export {dv.ref} --format webdataset --to ./shards  # -> ./shards/{dv.name}-00000.tar ...",
        "```",
        "",
        "vlforge itself:",
        "",
        "```python",
        "from vlforge.datasets import resolve_dataset",
        "from vlforge.settings import get_settings",
        f'table = resolve_dataset(get_settings(), "{dv.ref}").read_table("data")  # image as encoded bytes',
        "```",
        "",
        f"or train on it: `vlforge pretrain --dataset {dv.ref}`.",
    ]


def _decontamination(m: dict) -> list[str]:
    """What the card says about eval sets: whether this version is one, which eval versions it was
    decontaminated against and how many rows that dropped."""
    out = ["## Evaluation sets and decontamination", ""]
    if m.get("eval_set"):
        out += ["This version is an **evaluation set**: later pools are decontaminated against it.", ""]
    d = m.get("decontamination") or {}
    against = d.get("against") or []
    if against:
        out += [
            f"Decontaminated against {len(against)} eval set version(s) ({d.get('eval_images', 0)} images): "
            f"{d.get('contaminated', 0)} pool rows that copy one of their images (same image, re-encoded, "
            "rescaled or border-cropped) were dropped as `contaminated`.",
            "",
            *[f"- `{ref}`" for ref in against],
            "",
        ]
    else:
        out += ["Not decontaminated against any eval set.", ""]
    return out


def _recaption(m: dict) -> list[str]:
    """A recaptioned version (``vlforge recaption``): the captioning model and what it was asked."""
    r = m.get("recaption")
    if not r:
        return []
    c = r.get("captioner") or {}
    return [
        "## Synthetic captions",
        "",
        f"Column `{r.get('column')}` beside the original `caption`: written for {r.get('captioned')} of "
        f"{r.get('rows')} rows ({r.get('undecodable', 0)} images could not be decoded) from `{r.get('source_version')}` "
        f"by the VLM `{c.get('pinned') or c.get('uri')}` (registered model {c.get('name') or '-'}, version "
        f"{c.get('version') or '-'}), greedy decoding of at most {r.get('max_new_tokens')} tokens for the prompt "
        f"`{r.get('prompt')}`. Train on them with `vlforge pretrain --caption-col {r.get('column')}` (or mix "
        "them with the originals: `--caption-mix 0.5`).",
        "",
    ]


def render_card(dv: DatasetVersion) -> str:
    """The version's dataset card (Markdown with YAML front matter) from its manifest."""
    import yaml

    m = dv.manifest
    counts = m.get("counts") or {}
    scorer = m.get("scorer")
    body = [
        f"# {dv.ref}",
        "",
        f"Image-text pairs curated by vlforge from source `{m.get('source', '?')}`: "
        f"{counts.get('kept', 0)} kept of {counts.get('input', '?')}.",
        "",
        f"- URI: `{dv.uri}`",
        f"- created: {m.get('created_at', '?')}",
        f"- content hash (sha256 over the data files): `{m.get('content_hash', '?')}`",
        f"- MLflow run (experiment vlforge-datasets): {m.get('mlflow_run_id') or 'not logged'}",
        "",
        "## Counts",
        "",
        *_table(("count", "pairs"), [(k, v) for k, v in counts.items() if v or k in ("input", "kept")]),
        "",
        "## Scorer",
        "",
        (
            f"CLIP scorer `{scorer.get('uri')}` (registered model {scorer.get('name') or '-'}, "
            f"version {scorer.get('version') or '-'})"
            if scorer
            else "No scorer: the basic filters only (no CLIP scores)."
        ),
        "",
        "## Filter settings",
        "",
        "```json",
        json.dumps(m.get("filters") or {}, indent=2, sort_keys=True),
        "```",
        "",
        "## Lineage: raw batches and URL lists",
        "",
        *_lineage(m),
        "",
        "## Crawl compliance",
        "",
        *_compliance(m),
        "",
    ]
    body += _recaption(m)
    body += _decontamination(m)
    if m.get("licenses"):
        body += ["## Licences", "", *_table(("licence", "pairs"), sorted(m["licenses"].items())), ""]
    schema = (m.get("schema") or {}).get("data") or {}
    body += [
        "## Columns",
        "",
        *_table(("column", "type"), [(f"`{k}`", f"`{v}`") for k, v in schema.items()]),
        "",
    ]
    body += _how_to_load(dv)
    head = yaml.safe_dump(front_matter(dv), sort_keys=False, allow_unicode=True)
    return f"---\n{head}---\n\n" + "\n".join(body) + "\n"


def card_files(dv: DatasetVersion) -> dict[str, str]:
    """What ``VersionWriter.publish`` writes before the manifest: the card."""
    return {CARD: render_card(dv)}


def read_card(dv: DatasetVersion) -> str:
    """The version's card: its ``README.md``, or one rendered from the manifest for a version published before
    cards were written."""
    from vlforge import storage

    uri = storage.join(dv.uri, CARD)
    return storage.read_text(uri) if storage.exists(uri) else render_card(dv)
