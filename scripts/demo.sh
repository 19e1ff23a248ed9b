#!/usr/bin/env bash
# `make demo`: start a private redis-server (unless GLYPHQ_BROKER_URL is set), a GPU-queue worker, a
# render worker and Flower; wait until the model is loaded; submit the sample jobs and print the answers;
# then stop everything this script started. DEMO_KEEP=1 keeps them running until Ctrl-C.
# DEMO_WAIT_S (default 600) bounds the wait for the model; FLOWER_PORT (default 5555, else a free one).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
DEMO_DIR=${DEMO_DIR:-.demo}
DEMO_WAIT_S=${DEMO_WAIT_S:-600}
mkdir -p "$DEMO_DIR"
started=()  # the workers and Flower, each the leader of its own process group
redis_pid=""

stop() {  # pid...: TERM each (its main process only), wait up to 10 s, then KILL what is left of its group
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
stop_all() {
  # A worker's main process stops its own children (a TERM to the whole group would kill them
  # mid-shutdown), and it needs Redis until it has stopped: Redis goes last.
  stop "${started[@]}"
  if [ -n "$redis_pid" ]; then stop "$redis_pid"; fi
}
trap stop_all EXIT

say() { echo "== $*"; }
fail() { echo "demo: $*" >&2; exit 1; }
free_port() {  # the port given if it is free, else one the system picks
  "$PY" -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "$1"
}
redis_answers() {
  "$PY" -c 'import redis, sys; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()' "$1" 2>/dev/null
}
NODE_HOST=$("$PY" -c 'import socket; print(socket.gethostname())')

if [ -n "${GLYPHQ_BROKER_URL:-}" ]; then
  redis_answers "$GLYPHQ_BROKER_URL" || fail "no Redis answers at GLYPHQ_BROKER_URL=$GLYPHQ_BROKER_URL"
  say "using the Redis at GLYPHQ_BROKER_URL=$GLYPHQ_BROKER_URL"
else
  command -v redis-server >/dev/null || scripts/install-redis.sh
  REDIS_PORT=$(free_port 0)
  export GLYPHQ_BROKER_URL="redis://127.0.0.1:$REDIS_PORT/0"
  say "starting a private redis-server on 127.0.0.1:$REDIS_PORT, nothing saved (stopped at the end)"
  setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    >"$DEMO_DIR/redis.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 50); do redis_answers "$GLYPHQ_BROKER_URL" && break; sleep 0.1; done
  redis_answers "$GLYPHQ_BROKER_URL" || fail "redis-server did not start; see $DEMO_DIR/redis.log"
fi

tiny=()
if [ -z "${GLYPHQ_MODEL:-}" ]; then
  tiny=(--tiny)
  export GLYPHQ_MODEL=$DEMO_DIR/tiny-model
  if [ ! -f "$GLYPHQ_MODEL/config.json" ]; then
    say "building the tiny random-weight model in $GLYPHQ_MODEL"
    "$PY" -m glyphq.worker.tiny "$GLYPHQ_MODEL"
  fi
  say "GLYPHQ_MODEL is unset: using the tiny model. Its weights are random, so its answers are random words."
fi

say "starting the worker (log: $DEMO_DIR/worker.log)"
setsid "$VENV/bin/celery" -A glyphq.tasks worker -l info -n "demo@%h" >"$DEMO_DIR/worker.log" 2>&1 &
worker_pid=$!
started+=($worker_pid)
say "starting the render worker (log: $DEMO_DIR/render.log)"
setsid "$VENV/bin/celery" -A glyphq.tasks worker -Q render -c 2 -l info -n "demo-render@%h" >"$DEMO_DIR/render.log" 2>&1 &
render_pid=$!
started+=($render_pid)
FLOWER_PORT=$(free_port "${FLOWER_PORT:-5555}")
setsid "$VENV/bin/celery" -A glyphq.tasks flower --address=127.0.0.1 --port="$FLOWER_PORT" >"$DEMO_DIR/flower.log" 2>&1 &
started+=($!)

# Ready means the worker's own health check passes: it answers on its queue and, on queue gpu, its
# model is loaded (`glyphq health`, as Docker's healthchecks use it).
wait_healthy() {  # queue node pid log name task
  local queue=$1 node=$2 pid=$3 log=$4 name=$5 task=$6 start=$SECONDS last=-10
  while ! "$VENV/bin/glyphq" health --queue "$queue" --node "$node" --timeout 2 >"$DEMO_DIR/health-$queue.json" 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" && status=0 || status=$?
      tail -n 20 "$log" >&2
      fail "the $name exited with status $status before it was ready: see the last lines of $log above"
    fi
    if (( SECONDS - start >= DEMO_WAIT_S )); then
      tail -n 20 "$log" >&2
      fail "the $name was not ready after ${DEMO_WAIT_S} s: see the last lines of $log above. A large model" \
        "may need longer (it is downloaded first): DEMO_WAIT_S=1800 make demo"
    fi
    if (( SECONDS - last >= 10 )); then
      say "waiting for the $name to $task: $(( SECONDS - start )) s so far (at most ${DEMO_WAIT_S} s; log: $log)"
      last=$SECONDS
    fi
    sleep 1
  done
  say "the $name is ready after $(( SECONDS - start )) s"
}
wait_healthy gpu "demo@$NODE_HOST" "$worker_pid" "$DEMO_DIR/worker.log" worker "load GLYPHQ_MODEL=$GLYPHQ_MODEL"
wait_healthy render "demo-render@$NODE_HOST" "$render_pid" "$DEMO_DIR/render.log" "render worker" start
metrics_port() {  # the /metrics port `glyphq health` reported for the node
  "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["checks"]["worker"]["metrics_ports"][sys.argv[2]])' "$@" \
    2>/dev/null || echo "?"
}
say "Prometheus metrics: worker http://127.0.0.1:$(metrics_port "$DEMO_DIR/health-gpu.json" "demo@$NODE_HOST")/metrics, render worker http://127.0.0.1:$(metrics_port "$DEMO_DIR/health-render.json" "demo-render@$NODE_HOST")/metrics"

"$PY" scripts/demo_jobs.py "${tiny[@]}"

if [ "${DEMO_KEEP:-0}" = 1 ]; then
  say "DEMO_KEEP=1: Flower is at http://127.0.0.1:$FLOWER_PORT (tasks, workers, these jobs); the workers and Redis"
  say "keep running (GLYPHQ_BROKER_URL=$GLYPHQ_BROKER_URL). Ctrl-C stops everything the demo started."
  while true; do sleep 3600; done
fi
say "done: Flower, the workers and the demo's Redis stop now, with the demo."
say "To look at jobs in Flower, run DEMO_KEEP=1 make demo: it keeps everything running until Ctrl-C."
