#!/bin/sh
# Runs once, on the first start of an empty Postgres volume (docker-entrypoint-initdb.d):
# one database for the Prefect server, one for the MLflow tracking server, both owned by POSTGRES_USER.
set -eu

for db in "${PREFECT_DB:-prefect}" "${MLFLOW_DB:-mlflow}"; do
  echo "creating database ${db}"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" <<SQL
SELECT 'CREATE DATABASE "${db}" OWNER "${POSTGRES_USER}"'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '${db}')\gexec
SQL
done
