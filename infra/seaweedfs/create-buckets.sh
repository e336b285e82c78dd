#!/bin/sh
# One-shot init: wait for SeaweedFS (master and filer), then create the vlforge bucket, idempotently, with
# `weed shell` (it talks to the master and filer over gRPC: no S3 credentials on this side).
# SEAWEEDFS_MASTER: host:port, or host:port.grpcPort when the gRPC port is not port+10000.
set -eu

: "${S3_BUCKET:?S3_BUCKET is not set}"
master="${SEAWEEDFS_MASTER:-seaweedfs:9333}"
tries="${SEAWEEDFS_INIT_TRIES:-60}"

shell() {
  echo "$1" | weed shell -master="$master" 2>&1
}

i=0
until listing=$(shell "s3.bucket.list") && ! printf '%s' "$listing" | grep -qiE "error|fail|refused|no filer"; do
  i=$((i + 1))
  if [ "$i" -ge "$tries" ]; then
    echo "SeaweedFS at $master did not list buckets after $tries tries: $listing" >&2
    exit 1
  fi
  sleep 1
done

if printf '%s\n' "$listing" | grep -qw -- "$S3_BUCKET"; then
  echo "bucket ${S3_BUCKET} exists"
  exit 0
fi
shell "s3.bucket.create -name ${S3_BUCKET}"
if ! shell "s3.bucket.list" | grep -qw -- "$S3_BUCKET"; then
  echo "bucket ${S3_BUCKET} was not created" >&2
  exit 1
fi
echo "bucket ${S3_BUCKET} ready"
