"""One call of ``img2dataset.download`` on a staged list, writing into the raw batch folder in incremental mode.

img2dataset reads each input file whole before cutting it into shards, so it is handed the staged list as a
folder of part files of whole shards (:func:`tasks.ingest.staging.input_parts`): its memory is that of one part.

img2dataset spawns its workers, so the environment set here reaches them: OpenCV's pixel limit (a decompression
bomb is refused from its header, before any pixel buffer is allocated), the S3 endpoint for s3fs, and quiet
albumentations. img2dataset installs a SIGINT handler in the calling process; it is restored afterwards, and off
the main thread (where signal handlers cannot be set) the call runs in a child process forked from the warm server
of :mod:`tasks.ingest.workers`.

The network guard travels with the downloader: img2dataset builds one ``Downloader`` and pickles it to every
worker (spawned processes, or Ray tasks with ``distributor="ray"``); vlforge hands it a :class:`GuardedDownloader`
instead, which enters :func:`vlforge.netguard.guarded` around each shard in whichever process runs it, and
:func:`tasks.ingest.fetch.compliant` (the run's crawl policy: per-host gate, TDM, Retry-After, hash blocklist).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vlforge import defaults, netguard
from vlforge.netguard import NetworkPolicy

if TYPE_CHECKING:
    from tasks.ingest.fetch import CrawlPolicy
    from tasks.ingest.staging import StagedList
    from vlforge.settings import Settings  # not at run time: every download worker imports this module


@dataclass
class DownloadOptions:
    shard_size: int = defaults.SHARD_SIZE
    processes: int = 1
    threads: int = defaults.DOWNLOAD_THREADS
    distributor: str = defaults.DISTRIBUTOR
    timeout: float = defaults.DOWNLOAD_TIMEOUT_S
    retries: int = defaults.DOWNLOAD_RETRIES
    user_agent_token: str = "vlforge"
    image_size: int = defaults.IMAGE_SIZE
    min_image_size: int = defaults.MIN_DOWNLOAD_IMAGE_SIZE
    max_image_area: float = defaults.MAX_IMAGE_AREA
    max_aspect_ratio: float = float("inf")
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: list(defaults.DISALLOWED_HEADER_DIRECTIVES)
    )
    network: NetworkPolicy = field(default_factory=NetworkPolicy)  # checked before download and on every hop
    crawl: CrawlPolicy | None = (
        None  # user agent, per-host gate, TDM header, Retry-After, blocklist (fetch.py)
    )


def img2dataset_kwargs(
    input_uri: str, output_uri: str, extra_columns: list[str], opts: DownloadOptions
) -> dict:
    """The arguments of ``img2dataset.download`` for a staged parquet list (also used by bench/ingest.py)."""
    return dict(
        url_list=input_uri,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=list(extra_columns),
        output_folder=output_uri,
        output_format="parquet",
        incremental_mode="incremental",
        number_sample_per_shard=opts.shard_size,
        processes_count=opts.processes,
        thread_count=opts.threads,
        distributor=opts.distributor,
        timeout=opts.timeout,
        retries=opts.retries,
        user_agent_token=opts.user_agent_token,
        disallowed_header_directives=list(opts.disallowed_header_directives),
        image_size=opts.image_size,
        resize_mode="keep_ratio",
        resize_only_if_bigger=True,
        encode_format="jpg",
        encode_quality=95,
        min_image_size=opts.min_image_size,
        max_image_area=opts.max_image_area,
        max_aspect_ratio=opts.max_aspect_ratio,
        compute_hash="sha256",
        extract_exif=True,
        enable_wandb=False,
        max_shard_retry=1,
    )


@contextlib.contextmanager
def worker_environment(settings: Settings, max_image_area: float):
    """Environment variables img2dataset's workers need, restored on exit."""
    wanted = {
        "OPENCV_IO_MAX_IMAGE_PIXELS": str(int(min(max_image_area, 2**40))),
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    if settings.s3_endpoint_url and not os.environ.get("AWS_ENDPOINT_URL"):
        wanted["AWS_ENDPOINT_URL"] = settings.s3_endpoint_url
    old = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class GuardedDownloader:
    """img2dataset's downloader with the network guard on while it downloads a shard (picklable by reference, so
    it works in spawned multiprocessing workers and in Ray workers alike)."""

    def __init__(self, downloader, policy: netguard.NetworkPolicy, crawl: CrawlPolicy | None = None):
        self.downloader = downloader
        self.policy = policy
        self.crawl = crawl

    def __call__(self, row):
        from tasks.ingest.fetch import compliant

        with netguard.guarded(self.policy), compliant(self.crawl):
            return self.downloader(row)


@contextlib.contextmanager
def guarded_downloads(policy: netguard.NetworkPolicy, crawl: CrawlPolicy | None = None):
    """Make ``img2dataset.download`` wrap the downloader it builds in a :class:`GuardedDownloader`."""
    import importlib

    i2d_main = importlib.import_module("img2dataset.main")  # the module (the package's "main" is a function)
    original = i2d_main.Downloader
    built: list[GuardedDownloader] = []

    def build(**kwargs) -> GuardedDownloader:
        built.append(GuardedDownloader(original(**kwargs), policy, crawl))
        return built[-1]

    wrap = policy.active or crawl is not None
    if wrap:
        i2d_main.Downloader = build
    try:
        yield
    finally:
        i2d_main.Downloader = original
    if wrap and not built:  # an img2dataset that builds its downloader elsewhere: say so, loudly
        raise RuntimeError("img2dataset did not build its downloader through img2dataset.main.Downloader: "
                           "vlforge's network guard could not be installed in its workers")  # fmt: skip


def _download(
    kwargs: dict, ray_address: str | None, policy: netguard.NetworkPolicy, crawl: CrawlPolicy | None = None
) -> None:
    import img2dataset

    if kwargs["distributor"] == "ray":
        from vlforge.raycluster import init_ray
        from vlforge.settings import Settings

        init_ray(Settings(storage="/tmp/unused", ray_address=ray_address))
    from tasks.ingest.workers import forked_processes

    previous = signal.getsignal(signal.SIGINT)
    try:
        with guarded_downloads(policy, crawl), forked_processes():
            img2dataset.download(**kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_img2dataset(staged: StagedList, output_uri: str, opts: DownloadOptions, settings: Settings) -> None:
    from tasks.ingest.staging import input_parts

    parts = input_parts(staged, opts.shard_size)  # img2dataset loads each input file whole: give it parts
    kwargs = img2dataset_kwargs(parts, output_uri, staged.extra_columns, opts)
    with worker_environment(settings, opts.max_image_area):
        if threading.current_thread() is threading.main_thread():
            if opts.distributor == "ray":
                from vlforge.raycluster import init_ray

                init_ray(settings)
            _download(kwargs, settings.ray_address, opts.network, opts.crawl)
            return
        from tasks.ingest.workers import WarmChild

        child = WarmChild(
            _download, (kwargs, settings.ray_address, opts.network, opts.crawl), "vlforge-img2dataset"
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"img2dataset exited with status {child.exitcode} while writing {output_uri}")
