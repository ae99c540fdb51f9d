#!/usr/bin/env bash
# Runs once, on the first start of an empty data volume: one database for MLflow's backend store,
# one for Optuna's storage and the harness's cell claims. Names come from .env via the service env.
set -euo pipefail
for db in "$MLFLOW_DB" "$OPTUNA_DB"; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
done
