#!/bin/sh
# MLflow server: runs/models in Postgres, artifacts proxied (--serve-artifacts) to s3://$S3_BUCKET/mlartifacts,
# so clients need no S3 credentials for MLflow. The database URL is built here from the environment so the
# password never appears in compose files or in `docker inspect` of the command line. The native-stack test
# (tests/integration/test_stack.py) runs this same script on loopback, with the host and ports below set.
set -eu

: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${S3_BUCKET:?}"
# The driver is named: SQLAlchemy 2.1 made psycopg (3) the default for postgresql://; the image has psycopg2.
backend="postgresql+psycopg2://${POSTGRES_USER}:${POSTGRES_PASSWORD}@${POSTGRES_HOST:-postgres}:${POSTGRES_PORT:-5432}/${MLFLOW_DB:-mlflow}"

exec mlflow server \
  --host "${MLFLOW_HOST:-0.0.0.0}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --backend-store-uri "$backend" \
  --artifacts-destination "s3://${S3_BUCKET}/mlartifacts" \
  --serve-artifacts \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:5000,localhost,localhost:*,127.0.0.1:*}"
