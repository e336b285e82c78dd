#!/bin/sh
# vlforge container entrypoint. When VLFORGE_RAY_ADDRESS names a cluster (host:port, not ray://), join it as a
# node with no CPUs: the driver then runs against the cluster's GCS (a Ray driver needs a local raylet), and
# every Ray Data / Ray Train task is scheduled on ray-head / ray-worker.
set -eu

if [ -n "${VLFORGE_RAY_ADDRESS:-}" ] && [ "${VLFORGE_RAY_JOIN:-1}" = "1" ]; then
  case "$VLFORGE_RAY_ADDRESS" in
    ray://*|auto|local) ;;
    *)
      i=0
      until ray start --address="$VLFORGE_RAY_ADDRESS" --num-cpus=0 --num-gpus=0 --disable-usage-stats >/dev/null; do
        i=$((i + 1))
        if [ "$i" -ge 30 ]; then
          echo "cannot join the Ray cluster at $VLFORGE_RAY_ADDRESS" >&2
          exit 1
        fi
        sleep 2
      done
      ;;
  esac
fi

exec "$@"
