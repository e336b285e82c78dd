"""Every default a user meets in more than one place (CLI, Prefect forms, Python calls), written once.

Stage settings that form a group are pydantic models whose field defaults are the defaults
(``tasks.curate.filters.FilterConfig``, ``tasks.train.args.PretrainArgs``/``FinetuneArgs``,
``models.lora.LoraArgs``); the CLI options and the Prefect forms are derived from those models. The values
below are the ones shared across groups.
"""

from __future__ import annotations

# The registry alias users consume, and the model the refresh flow scores with and a fine-tune starts from.
DEFAULT_MODEL_URI = "models:/vlforge-clip@champion"
# The model recipe (models/configs/*.json) of a training from scratch: clip-tiny's towers on 64 px images through a
# convolutional stem (models/convstem.py). On a held-out 30-class colour x shape task clip-tiny's 8 px patchify at
# 32 px learns colours and few shapes; clip-conv-64 at pretraining's defaults (batch 8, lr 5e-4, 80 warmup steps:
# tasks/train/args.py) learns shapes too (BENCHMARKS.md "Recipes"; issue #14).
DEFAULT_RECIPE = "clip-conv-64"
# The VLM a VLM fine-tune (`vlforge finetune --recipe vlm`) starts from, and the fine-tune recipe that names
# "the VLM recipe the base was trained with".
DEFAULT_VLM_URI = "models:/vlforge-vlm@champion"
VLM_FINETUNE_RECIPE = "vlm"
# The VLM recipe (models/configs/vlm/*.json) of a VLM stage 1 (`vlforge pretrain --recipe vlm-...`, the Prefect
# form's VLM group, the demo).
DEFAULT_VLM_RECIPE = "vlm-tiny"
# The refresh deployment's schedule: 03:00 every day.
REFRESH_CRON = "0 3 * * *"

# Ingest (img2dataset) options.
SHARD_SIZE = 10_000
DOWNLOAD_THREADS = 64
DOWNLOAD_TIMEOUT_S = 10.0
DOWNLOAD_RETRIES = 2
IMAGE_SIZE = 256
MIN_DOWNLOAD_IMAGE_SIZE = 10
MAX_IMAGE_AREA = 50_000_000
DISALLOWED_HEADER_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
DISTRIBUTOR = "multiprocessing"

# Evaluation and promotion: a held-out split of at least this many pairs (fewer cannot tell two models apart);
# how much a fine-tune may lose on a general eval set against its base and still be promoted.
MIN_EVAL_PAIRS = 200
MAX_EVAL_PAIRS = (
    5000  # and at most this many (MSCOCO's 5k test split): a web-scale fraction would be millions
)
GENERAL_MARGIN = 0.05

# Curation: DataComp's best CLIP-score filter keeps the top 30 % of a pool.
TOP_FRACTION = 0.3
# Pairs a CLIP scorer embeds at once (curate, the curation experiment's pool).
SCORING_BATCH = 64

# Crawl compliance (tasks/ingest: robots, optout, politeness, fetch, blocklist). Per host over the whole run: at
# most this many requests in flight and request starts a second (a robots.txt Crawl-delay widens the interval).
MAX_CONNECTIONS_PER_HOST = 8
MAX_REQUESTS_PER_HOST_PER_S = 20.0
RATE_LIMIT_TRIES = 3  # answers 429/503 (Retry-After honoured) before a row ends rate_limited
BLOCKLIST_DISTANCE = (
    31  # PDQ Hamming distance (of 256 bits) that counts as a match: ThreatExchange's threshold
)
