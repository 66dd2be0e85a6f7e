#!/usr/bin/env bash
# The README's screenshots, taken in a real browser (headless Chromium, Debian's package `chromium`):
#
#   docs/mlflow_compare_sweep_points.png  MLflow's compare view of two points of a sweep (the newest holding both)
#   docs/prefect_pipeline_metrics.png     the latest pipeline flow run's metrics table artifact (Prefect UI)
#   docs/prefect_pipeline_flow_run.png    that flow run's page: its DVC stage tasks and logs
# (The flow run page's Artifacts tab cannot be linked to: the UI resets ?tab= while the run loads.)
#
# It reads this checkout's own stores (mlflow.db, .prefect/), starts `mlflow server` and
# `prefect server start --no-services` on free local ports, finds the runs through their REST APIs,
# and stops both servers on exit. It installs nothing (`apt-get install chromium`, or `make screenshots`).
#
#   scripts/screenshots.sh [POINT_A POINT_B]   # sweep points to compare (default: joint_label classcond_cfg2,
#                                              # else the sweep's first two finished points)
# Env: MTDIFF_SHOT_BUDGET_MS (Chromium's virtual time budget, default 15000; doubled on a blank page),
#      MTDIFF_SHOT_DIR (default docs), CHROMIUM (default: chromium on PATH).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
BIN=$(dirname "$PY")
OUT=${MTDIFF_SHOT_DIR:-docs}
BUDGET=${MTDIFF_SHOT_BUDGET_MS:-15000}
POINT_A=${1:-joint_label}
POINT_B=${2:-classcond_cfg2}

export DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME=$ROOT/.prefect   # the repo's Prefect home (as the Makefile sets it)
unset PREFECT_API_URL

log() { echo "screenshots: $*" >&2; }
die() { log "error: $*"; exit 1; }

CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$CHROMIUM" ] || die "chromium not found: apt-get install chromium (Debian's package), or set CHROMIUM"
[ -f mlflow.db ] || die "no mlflow.db in $ROOT: run a sweep first (make sweep)"
[ -f .prefect/prefect.db ] || die "no .prefect/prefect.db in $ROOT: run the pipeline first (make run)"
mkdir -p "$OUT"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
MLFLOW_PORT=$(free_port)
PREFECT_PORT=$(free_port)
# the browser reaches MLflow under a host name that is not "localhost"/"127.0.0.1" (mapped to 127.0.0.1
# by Chromium itself): MLflow 3's UI opens its Assistant side panel over the page on those names
MLFLOW_HOST=mtdiff-mlflow
MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
MLFLOW_UI=http://$MLFLOW_HOST:$MLFLOW_PORT
PREFECT_URL=http://127.0.0.1:$PREFECT_PORT
TMP=$(mktemp -d -t mtdiff-shots-XXXXXX)

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do  # each server runs in its own session: stop it with its workers
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "mlflow server on $MLFLOW_URL (sqlite:///$ROOT/mlflow.db), prefect server on $PREFECT_URL (PREFECT_HOME=$PREFECT_HOME)"
# a read-only view: no job runner (its huey consumers only slow the start)
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nice -n 10 "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$ROOT/mlflow.db" --allowed-hosts "127.0.0.1:$MLFLOW_PORT,$MLFLOW_HOST:$MLFLOW_PORT" \
  --cors-allowed-origins "$MLFLOW_UI" >"$TMP/mlflow.log" 2>&1 &
PIDS+=($!); disown
# the UI asks the API at this URL (default: port 4200)
PREFECT_UI_API_URL=$PREFECT_URL/api PREFECT_SERVER_UI_API_URL=$PREFECT_URL/api \
  setsid nice -n 10 "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --no-services \
  >"$TMP/prefect.log" 2>&1 &
PIDS+=($!); disown

wait_for() {  # url name log
  for _ in $(seq 600); do  # a loaded machine: a niced server may need minutes to start
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.5
  done
  tail -20 "$3" >&2
  die "$2 did not answer at $1 within 300 s"
}
wait_for "$MLFLOW_URL/health" "mlflow server" "$TMP/mlflow.log"
wait_for "$PREFECT_URL/api/health" "prefect server" "$TMP/prefect.log"

# -- the ids, from the servers' REST APIs ---------------------------------------------------------
read -r MLFLOW_COMPARE PREFECT_RUN PREFECT_ARTIFACT < <(
  MLFLOW_URL=$MLFLOW_URL MLFLOW_UI=$MLFLOW_UI PREFECT_URL=$PREFECT_URL POINT_A=$POINT_A POINT_B=$POINT_B "$PY" - <<'EOF'
import json, os, sys, urllib.parse, urllib.request

def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)

m, p = os.environ["MLFLOW_URL"], os.environ["PREFECT_URL"]
exps = [e["experiment_id"] for e in post(f"{m}/api/2.0/mlflow/experiments/search", {"max_results": 1000})["experiments"]]
runs, token = [], None
while True:
    body = {"experiment_ids": exps, "max_results": 1000, "order_by": ["attributes.start_time DESC"],
            "filter": "tags.`mtdiff.kind` = 'sweep_point' AND attributes.status = 'FINISHED'"}
    if token:
        body["page_token"] = token
    res = post(f"{m}/api/2.0/mlflow/runs/search", body)
    runs += res.get("runs", [])
    token = res.get("next_page_token")
    if not token:
        break
sweeps = {}  # parent (sweep) run -> its finished points, newest sweep first
for run in runs:
    tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
    sweeps.setdefault(tags.get("mlflow.parentRunId"), []).append((tags.get("mtdiff.sweep_point"), run["info"]))
want = (os.environ["POINT_A"], os.environ["POINT_B"])
group = next((pts for pts in sweeps.values() if set(want) <= {n for n, _ in pts}), None) \
    or next((pts for pts in sweeps.values() if len(pts) >= 2), None)  # the newest sweep holding both, else any
if group is None:
    sys.exit("no sweep with two finished points (MLflow runs tagged mtdiff.kind=sweep_point): run make sweep")
named = {name: info for name, info in reversed(group)}
wanted = [named[n] for n in want if n in named]
chosen = wanted if len(wanted) == 2 else [info for _, info in reversed(group)][:2]
print(f"points: {[n for n, i in group if i in chosen]}", file=sys.stderr)
# the compare route of MLflow's UI (mlflow/server/js: getCompareRunPageRoute): JSON lists in the query
ids = json.dumps([i["run_id"] for i in chosen], separators=(",", ":"))
eids = json.dumps(sorted({i["experiment_id"] for i in chosen}), separators=(",", ":"))
compare = f"{os.environ['MLFLOW_UI']}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(eids)}"

arts = post(f"{p}/api/artifacts/filter", {"artifacts": {"key": {"any_": ["mtdiff-pipeline-metrics"]}},
                                          "sort": "CREATED_DESC", "limit": 50})
art = next((a for a in arts if a.get("flow_run_id")), None)
if art is None:
    sys.exit("no pipeline flow run with artifacts in .prefect/ (artifact mtdiff-pipeline-metrics): run make run")
print(f"flow run {art['flow_run_id']}, artifact {art['id']}", file=sys.stderr)
print(compare, art["flow_run_id"], art["id"])
EOF
) || die "could not find the runs to show"
[ -n "${PREFECT_ARTIFACT:-}" ] || die "could not find the runs to show"

# -- the screenshots ------------------------------------------------------------------------------
blank() {  # a page that has not rendered: nearly one colour
  "$PY" - "$1" <<'EOF'
import sys
from PIL import Image
im = Image.open(sys.argv[1]).convert("L").resize((400, 250))
hist = im.histogram()
sys.exit(0 if max(hist) > 0.97 * sum(hist) else 1)
EOF
}

shoot() {  # name url [WxH]
  local name=$1 url=$2 size=${3:-1600,1000} budget=$BUDGET png="$OUT/$1.png"
  for attempt in 1 2 3; do
    log "$png <- $url (virtual time budget ${budget} ms)"
    rm -f "$png"
    timeout 180 nice -n 10 "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars \
      --host-resolver-rules="MAP $MLFLOW_HOST 127.0.0.1" --disable-dev-shm-usage --no-first-run --no-default-browser-check --user-data-dir="$TMP/chromium" \
      --window-size="$size" --virtual-time-budget="$budget" --screenshot="$png" "$url" \
      >"$TMP/chromium.log" 2>&1 || true
    if [ -s "$png" ] && ! blank "$png"; then return 0; fi
    log "blank or missing page, retrying"
    budget=$((budget * 2))
    sleep 3
  done
  tail -5 "$TMP/chromium.log" >&2
  die "no rendered page for $name"
}

shoot mlflow_compare_sweep_points "$MLFLOW_COMPARE" 1600,2000   # tall: the parameter and metric tables too
shoot prefect_pipeline_metrics "$PREFECT_URL/artifacts/artifact/$PREFECT_ARTIFACT" 1600,1000
shoot prefect_pipeline_flow_run "$PREFECT_URL/runs/flow-run/$PREFECT_RUN" 1600,1000
log "done: $OUT/mlflow_compare_sweep_points.png $OUT/prefect_pipeline_metrics.png $OUT/prefect_pipeline_flow_run.png"
