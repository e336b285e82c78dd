"""Ray session helpers: connect to the configured cluster or start Ray locally, once per process."""

from __future__ import annotations

import logging
import os

from vlforge.settings import Settings

# This machine's cores, set when this process started a local Ray (whose logical CPUs may exceed them).
_local_cores: int | None = None


def init_ray(settings: Settings, num_cpus: int | None = None):
    """``ray.init`` against ``settings.ray_address`` (or ``RAY_ADDRESS``), or a local Ray if unset."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    use_train_v2()
    address = settings.ray_address
    kwargs = dict(ignore_reinit_error=True, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        from vlforge.errors import ServerUnreachableError

        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # ConnectionError and friends
            raise ServerUnreachableError(
                f"cannot connect to the Ray cluster at {address!r} ({exc}); check VLFORGE_RAY_ADDRESS / RAY_ADDRESS "
                "or unset it to run Ray locally"
            ) from exc
    else:
        # Ray starts its worker processes (Train workers, scorer actors, Ray Data tasks) at niceness 15 so a
        # shared node's daemons stay responsive. On a machine where Ray is started for vlforge alone that
        # work is the point: at 15 every process at normal priority (Ray's own GCS, raylet and log monitor
        # among them) preempts it, and a plain loop it is compared with runs at 0 (BENCHMARKS.md, Train).
        # RAY_worker_niceness set in the environment still wins.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Ray Train starts a preemption watcher actor (one more Python process importing Ray Train) for every
        # training, to act on a cloud provider's notice that a node is about to go. A Ray started here lives
        # on this machine alone: no notice can come, and on a small machine the process delays the training.
        # A cluster (``address`` above) keeps Ray's default.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's controller looks at its workers every 2 s: a finished training (or a dead worker) waits up
        # to that long to be seen, and a short training pays it at its end and at every restart. A poll is one
        # call per worker, cheap for the few workers one machine holds; a cluster keeps Ray's default.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        # Logical CPUs may exceed the cores: Ray Data tasks and Train workers share a small machine.
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        global _local_cores
        _local_cores = os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, **kwargs)
    return ray


def use_train_v2() -> None:
    """Ray Train V2 is the API we write against: ``ray.train`` reads this when first imported, and Ray's workers
    inherit it. Called before that import wherever it may come first (a training in the driver starts no Ray)."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def cluster_logical_cpus() -> float:
    """Ray's logical CPUs in the connected cluster (what scheduling counts)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


def cluster_cpus() -> int:
    """Cores to plan compute for: the cluster's CPUs, or this machine's cores when Ray was started locally
    here (whose logical CPUs are raised so that Ray Data tasks and Train workers can share a small machine)."""
    logical = int(cluster_logical_cpus())
    return max(1, min(logical, _local_cores) if _local_cores else logical)


def cluster_gpus() -> int:
    """GPUs in the connected cluster (0 on a machine without any)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
