#!/bin/sh
# Entry point of the compose `worker` service: `droptune worker` on $DROPTUNE_SPEC.
#
# Replicas of one service (`docker compose up --scale worker=N`) run the same command, so each
# derives its own --worker-index from its container hostname: the index offsets the sampler seed,
# and without it every replica would sample the same first parameters. The storage URL and the
# MLflow tracking URI come in DROPTUNE_STORAGE and MLFLOW_TRACKING_URI, never on a command line.
set -eu
: "${DROPTUNE_SPEC:?set DROPTUNE_SPEC to a spec file, e.g. studies/digits-mlp.yaml}"
: "${DROPTUNE_STORAGE:?set DROPTUNE_STORAGE to the Optuna storage URL}"
host=$(hostname)
index=$(printf '%s' "$host" | cksum | cut -d ' ' -f 1)
index=$((index % 100000))
exec droptune worker "$DROPTUNE_SPEC" --worker-index "$index" "$@"
