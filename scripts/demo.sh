#!/usr/bin/env bash
# `make demo`: start Redis (if none answers), a GPU-queue worker and Flower, submit the sample jobs,
# print the answers, then stop everything this script started. DEMO_KEEP=1 keeps them running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
DEMO_DIR=.demo
FLOWER_PORT=${FLOWER_PORT:-5555}
mkdir -p "$DEMO_DIR"
started=()

stop_all() {
  for pid in "${started[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${started[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT

redis_answers() {
  "$PY" -c 'import redis, sys; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()' "$1" 2>/dev/null
}

export GLYPHQ_BROKER_URL=${GLYPHQ_BROKER_URL:-redis://localhost:6379/0}
if redis_answers "$GLYPHQ_BROKER_URL"; then
  echo "== using the Redis at $GLYPHQ_BROKER_URL"
elif [ "$GLYPHQ_BROKER_URL" = "redis://localhost:6379/0" ]; then
  command -v redis-server >/dev/null || scripts/install-redis.sh
  echo "== starting redis-server on localhost:6379 (stopped at the end)"
  setsid redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no >"$DEMO_DIR/redis.log" 2>&1 &
  started+=($!)
  for _ in $(seq 50); do redis_answers "$GLYPHQ_BROKER_URL" && break; sleep 0.1; done
else
  echo "no Redis answers at GLYPHQ_BROKER_URL=$GLYPHQ_BROKER_URL" >&2
  exit 1
fi

if [ -z "${GLYPHQ_MODEL:-}" ]; then
  export GLYPHQ_MODEL=$DEMO_DIR/tiny-model
  if [ ! -f "$GLYPHQ_MODEL/config.json" ]; then
    echo "== building the tiny random-weight model in $GLYPHQ_MODEL"
    "$PY" -m worker.tiny "$GLYPHQ_MODEL"
  fi
  echo "== GLYPHQ_MODEL is unset: using the tiny model. Its weights are random, so its answers are random words."
fi

echo "== starting the worker (log: $DEMO_DIR/worker.log)"
setsid "$VENV/bin/celery" -A tasks worker -l info -n "demo@%h" >"$DEMO_DIR/worker.log" 2>&1 &
started+=($!)
echo "== starting the render worker (log: $DEMO_DIR/render.log)"
setsid "$VENV/bin/celery" -A tasks worker -Q render -c 2 -l info -n "demo-render@%h" >"$DEMO_DIR/render.log" 2>&1 &
started+=($!)
echo "== starting Flower on http://127.0.0.1:$FLOWER_PORT (log: $DEMO_DIR/flower.log)"
setsid "$VENV/bin/celery" -A tasks flower --address=127.0.0.1 --port="$FLOWER_PORT" >"$DEMO_DIR/flower.log" 2>&1 &
started+=($!)

for _ in $(seq 600); do
  grep -q " ready." "$DEMO_DIR/worker.log" && grep -q "model ready: " "$DEMO_DIR/worker.log" && break
  if ! kill -0 "${started[-3]}" 2>/dev/null; then cat "$DEMO_DIR/worker.log" >&2; exit 1; fi
  sleep 0.5
done

"$PY" scripts/demo_jobs.py
echo "== Flower: http://127.0.0.1:$FLOWER_PORT  (tasks, workers, and these jobs)"

if [ "${DEMO_KEEP:-0}" = 1 ]; then
  echo "== DEMO_KEEP=1: worker and Flower keep running; Ctrl-C stops them"
  while true; do sleep 3600; done
fi
echo "== stopping what the demo started"
