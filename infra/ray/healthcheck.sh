#!/bin/sh
# Healthy when the cluster's GCS at RAY_HEAD_ADDRESS answers and this node runs a raylet.
set -eu
ray health-check --address "${RAY_HEAD_ADDRESS:-ray-head:6379}" >/dev/null 2>&1
test -S /tmp/ray/session_latest/sockets/raylet
