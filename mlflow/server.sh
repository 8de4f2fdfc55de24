#!/usr/bin/env bash
# Start the MLflow tracking server (UI + REST API) over this project's store.
#
#   bash mlflow/server.sh                          # http://127.0.0.1:5000
#   PORT=5001 bash mlflow/server.sh
#   BACKEND_STORE_URI=postgresql://user@db/mlflow ARTIFACTS=s3://bucket/faerec bash mlflow/server.sh
#   bash mlflow/server.sh --allowed-hosts mlflow.lab.example   # extra `mlflow server` options
#
# Environment overrides:
#   HOST               interface to bind (default 127.0.0.1)
#   PORT               port (default 5000)
#   BACKEND_STORE_URI  run store (default: the embedded SQLite file mlflow/mlflow.db,
#                      the same store `run_search.py` writes without --tracking-uri)
#   ARTIFACTS          where uploaded artifacts are kept (default mlflow/artifacts)
#
# Security: the server has NO authentication. Anyone who can reach HOST:PORT can read,
# change and delete every run. Binding to 0.0.0.0 (or any non-loopback HOST) exposes it to
# the whole network; do that only behind a firewall or an authenticating reverse proxy,
# and add --allowed-hosts for the host names clients use.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
host="${HOST:-127.0.0.1}"
port="${PORT:-5000}"
store="${BACKEND_STORE_URI:-sqlite:///$repo/mlflow/mlflow.db}"
artifacts="${ARTIFACTS:-$repo/mlflow/artifacts}"

mlflow_bin="$repo/.venv/bin/mlflow"
if [[ ! -x "$mlflow_bin" ]]; then
    mlflow_bin="$(command -v mlflow)" || { echo "mlflow not found: run 'make' first" >&2; exit 1; }
fi

mkdir -p "$repo/mlflow"
case "$artifacts" in *://*) ;; *) mkdir -p "$artifacts" ;; esac

# Lean server: one worker and no background job runner (about 5 s and 450 MiB to start,
# against 12 s and 1.9 GiB with the defaults).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

# the store URI may hold a database password: print it without the user part
echo "MLflow UI: http://$host:$port  (store: $(sed -E 's#//[^/@]*@#//***@#' <<< "$store"))"
exec "$mlflow_bin" server \
    --backend-store-uri "$store" \
    --serve-artifacts --artifacts-destination "$artifacts" \
    --host "$host" --port "$port" --workers 1 "$@"
