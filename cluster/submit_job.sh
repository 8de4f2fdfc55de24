#!/usr/bin/env bash
# Run a search on a running Ray cluster with `ray job submit` (see cluster/README.md).
#
#   RAY_ADDRESS=http://HEAD:8265 TRACKING_URI=http://MLFLOW_HOST:5000 \
#   STORAGE_PATH=s3://BUCKET/faerec bash cluster/submit_job.sh --space search_spaces/faerec.yaml
#
# The repository (without .venv, results, the MLflow store, caches and .git) is uploaded as
# the job's working directory; the head node runs
#     $JOB_PYTHON run_search.py ARGS... --address auto --tracking-uri $TRACKING_URI --storage-path $STORAGE_PATH
# and streams its output here. Paths in ARGS are read on the head node: a space file
# inside the repository (search_spaces/...) always works.
#
# Environment:
#   RAY_ADDRESS       the cluster's job server, http://HEAD:8265 (the dashboard port)
#   TRACKING_URI      MLflow tracking URI for the job (default: $MLFLOW_TRACKING_URI). Use a
#                     server every node reaches (bash mlflow/server.sh on some host); a
#                     sqlite:/// path is read on the head node.
#   STORAGE_PATH      Ray Tune results and checkpoints: s3://..., gs://... or a shared folder
#                     mounted at the same path on every node.
#   Both are required: without them the job would write into its temporary copy of the
#   repository on the head node, where the results are lost.
#   JOB_PYTHON        the head node's Python with this project installed (default: python,
#                     as found on the PATH the cluster was started with: start it with the
#                     project's venv activated)
#   FAEREC_CACHE, FAEREC_SHARED_STORAGE   passed on to the job when set (cache folder on the
#                     head node; the multi-node storage check's escape hatch)
#   SUBMISSION_ID     the job's id (default: one Ray makes up)
#   RAY_AUTH_MODE     default token: the cluster's token must be on this machine, in
#                     ~/.ray/auth_token, in the file named by RAY_AUTH_TOKEN_PATH, or in
#                     RAY_AUTH_TOKEN. It is never printed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tracking_uri="${TRACKING_URI:-${MLFLOW_TRACKING_URI:-}}"
storage_path="${STORAGE_PATH:-}"
if [[ -z "${RAY_ADDRESS:-}" || -z "$tracking_uri" || -z "$storage_path" ]]; then
    echo "error: set RAY_ADDRESS (http://HEAD:8265), TRACKING_URI and STORAGE_PATH;" \
         "see cluster/README.md" >&2
    exit 2
fi
if [[ $# -eq 0 ]]; then
    echo "error: give run_search.py's arguments, at least --space FILE" >&2
    exit 2
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

ray_bin="$repo/.venv/bin/ray"
[[ -x "$ray_bin" ]] || ray_bin="$(command -v ray)"
py_bin="$repo/.venv/bin/python"
[[ -x "$py_bin" ]] || py_bin="$(command -v python3)"

# The runtime environment as JSON, built by Python so that no value needs escaping here.
runtime_env="$("$py_bin" - "$repo" <<'EOF'
import json, os, sys
env_vars = {k: os.environ[k] for k in ("FAEREC_CACHE", "FAEREC_SHARED_STORAGE")
            if os.environ.get(k)}
env_vars.setdefault("RAY_USAGE_STATS_ENABLED", "0")
print(json.dumps({
    "working_dir": sys.argv[1],
    # Uploaded to the head node on every submission: only the code and the spaces.
    "excludes": [".venv/", "results/", "mlflow/mlflow.db", "mlflow/artifacts/", ".cache/",
                 ".git/", ".pytest_cache/", "*.egg-info/", "__pycache__/", ".whl/"],
    "env_vars": env_vars,
}))
EOF
)"

submission=()
[[ -n "${SUBMISSION_ID:-}" ]] && submission=(--submission-id "$SUBMISSION_ID")

exec "$ray_bin" job submit --address "$RAY_ADDRESS" "${submission[@]}" \
    --runtime-env-json "$runtime_env" \
    -- "${JOB_PYTHON:-python}" run_search.py "$@" --address auto \
       --tracking-uri "$tracking_uri" --storage-path "$storage_path"
