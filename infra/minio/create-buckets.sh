#!/bin/sh
# One-shot init: wait for MinIO, then create the vlforge bucket (idempotent). Credentials come from the
# environment (MINIO_ROOT_USER / MINIO_ROOT_PASSWORD); nothing is written to disk or echoed.
set -eu

: "${S3_BUCKET:?S3_BUCKET is not set}"
endpoint="${MINIO_ENDPOINT:-http://minio:9000}"

i=0
until mc alias set vlforge "$endpoint" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1; do
  i=$((i + 1))
  if [ "$i" -ge 30 ]; then
    echo "MinIO at $endpoint did not answer after 60 s" >&2
    exit 1
  fi
  sleep 2
done

mc mb --ignore-existing "vlforge/${S3_BUCKET}"
echo "bucket ${S3_BUCKET} ready"
