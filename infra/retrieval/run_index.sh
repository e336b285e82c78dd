#!/usr/bin/env bash
# Build a clip-retrieval kNN index over a dataset version's embeddings:
#   infra/retrieval/run_index.sh <version-uri>/embeddings <index-folder>
# Runs `clip-retrieval index` from this folder's .venv. The registry's torchvision wheel is a CUDA build that
# cannot load next to the CPU torch, and clip-retrieval's CLI imports torchvision (via all_clip/open_clip) even
# for `index`; then this falls back to running clip-retrieval's own clip_index.py as a script (the same
# function the CLI's `index` command calls: autofaiss over img_emb/ and text_emb/, metadata copied alongside).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$here/.venv/bin/python"
emb="$1"; out="$2"; shift 2
[ -x "$py" ] || { echo "error: $here/.venv is missing; build it with: make -C infra/retrieval venv" >&2; exit 2; }
if "$here/.venv/bin/clip-retrieval" --help >/dev/null 2>&1; then
  exec "$here/.venv/bin/clip-retrieval" index --embeddings_folder "$emb" --index_folder "$out" "$@"
fi
script="$("$py" -c 'import importlib.util as u; print(u.find_spec("clip_retrieval").submodule_search_locations[0])')/clip_index.py"
exec "$py" "$script" --embeddings_folder "$emb" --index_folder "$out" "$@"
