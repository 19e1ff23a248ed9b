"""What ``glyphq serve`` adds to a job, side by side with ``submit`` in process (CPU, tiny model).

    python bench/gateway.py --out DIR [--jobs 24] [--intake 400] [--clients 8] [--model-dir DIR]

Starts redis-server, a real worker on the tiny model and ``glyphq serve``, then measures, alternating
the two paths job by job so that both see the same machine:

- **latency**: one job at a time, page sizes cycling through 1280x720, 896x504, 640x480, 448x448 and
  answers of 16, 64 or 256 tokens. The gateway path is the OpenAI client's round trip (the image sent
  as a data URL); the in-process path is ``submit`` + ``Job.result``. Each path's overhead is its wall
  time minus the job's own time at the worker (``timings``: queue, preprocess, generate, cleanup).
- **intake**: requests/s of ``POST /v1/jobs`` against ``submit`` alone, ``--clients`` threads each, on a
  Redis database no worker reads (so only enqueueing is measured).
- **throughput**: jobs/s end to end with ``--clients`` concurrent clients, through the worker.

Prints one table and writes ``gateway.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import SIZES, page  # noqa: E402
from bench.gpu_soak import free_port, redis_and_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENS = (16, 64, 256)


def own_time(result: dict) -> float:
    t = result["timings"]
    return float(t["queue_s"] + t["preprocess_s"] + t["generate_s"] + t["cleanup_s"])


def messages(image: bytes, question: str) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def start_gateway(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([str(Path(sys.executable).with_name("glyphq")), "serve", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"glyphq serve did not start: {log.read_text()[-2000:]}")


def via_gateway(client, model: str, image: bytes, question: str, tokens: int) -> tuple[float, dict]:
    start = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=messages(image, question), max_tokens=tokens)
    wall = time.perf_counter() - start
    return wall, {"timings": reply.model_extra["glyphq"]["timings"], "tokens_out": reply.usage.completion_tokens}


def in_process(image: bytes, question: str, tokens: int) -> tuple[float, dict]:
    from glyphq.producer import submit

    start = time.perf_counter()
    result = submit(image, question, max_new_tokens=tokens).result(timeout=600)
    return time.perf_counter() - start, result


def summary(walls: list[float], overheads: list[float]) -> dict:
    return {"wall_median_s": round(statistics.median(walls), 4),
            "overhead_median_ms": round(1000 * statistics.median(overheads), 1),
            "overhead_p90_ms": round(1000 * sorted(overheads)[int(0.9 * (len(overheads) - 1))], 1)}


def latency(client, model: str, jobs: int) -> dict:
    images = {size: page(size, 3) for size in SIZES}
    runs: dict[str, tuple[list[float], list[float]]] = {"gateway": ([], []), "submit": ([], [])}
    in_process(images[SIZES[0]], "Warm-up?", 4)
    for i in range(jobs):
        image, tokens = images[SIZES[i % len(SIZES)]], TOKENS[i % len(TOKENS)]
        question = f"What is the total on invoice {i}?"
        order = ("gateway", "submit") if i % 2 == 0 else ("submit", "gateway")
        for path in order:
            wall, result = (via_gateway(client, model, image, question, tokens) if path == "gateway"
                            else in_process(image, question, tokens))
            runs[path][0].append(wall)
            runs[path][1].append(wall - own_time(result))
    return {path: summary(*values) for path, values in runs.items()}


def rate(fn, count: int, clients: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(fn, range(count)))
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "glyphq-tiny"))
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--intake", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--submit-intake", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.submit_intake:  # the child process of the intake figure: print submit's requests/s
        from glyphq.producer import submit

        image = page((896, 504), 5)
        print(rate(lambda i: submit(image, "Enqueue only?", max_new_tokens=16), args.submit_intake, args.clients))
        return 0
    redis_port = free_port()
    os.environ.update({"GLYPHQ_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0", "GLYPHQ_METRICS_PORT": "0",
                       "GLYPHQ_DEVICE": "cpu", "GLYPHQ_MODEL": args.model_dir, "PYTHONUNBUFFERED": "1"})
    if not (Path(args.model_dir) / "config.json").exists():
        from glyphq.worker.tiny import build

        build(Path(args.model_dir))
    import httpx
    import openai

    from glyphq.producer import submit

    with redis_and_worker(redis_port, dict(os.environ), "gatewaybench") as (_worker, log_path):
        deadline = time.monotonic() + 120
        while "model ready" not in log_path.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
        port, idle_port = free_port(), free_port()
        gateway = start_gateway(port, dict(os.environ), log_path.with_name("serve.log"))
        idle_env = {**os.environ, "GLYPHQ_BROKER_URL": f"redis://127.0.0.1:{redis_port}/3", "GLYPHQ_MAX_QUEUE": "0"}
        idle = start_gateway(idle_port, idle_env, log_path.with_name("serve-idle.log"))
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0,
                                   timeout=600)
            from glyphq.celeryconfig import default_served_name

            served = default_served_name(args.model_dir)  # the name the gateway answers to
            figures: dict = {"latency": latency(client, served, args.jobs)}

            image = page((896, 504), 5)
            body = {"messages": messages(image, "Enqueue only?"), "max_tokens": 16}
            with httpx.Client(timeout=60) as http:
                gateway_rps = rate(lambda i: http.post(f"http://127.0.0.1:{idle_port}/v1/jobs", json=body)
                                   .raise_for_status(), args.intake, args.clients)
            # submit's Celery app reads the broker at import: enqueue-only runs in a process of its own.
            submit_rps = float(subprocess.run(
                [sys.executable, __file__, "--out", args.out, "--submit-intake", str(args.intake), "--clients",
                 str(args.clients)], env=idle_env, check=True, capture_output=True, text=True).stdout)
            figures["intake_rps"] = {"gateway": round(gateway_rps, 1), "submit": round(submit_rps, 1)}

            count = 4 * args.clients
            gateway_jps = rate(lambda i: via_gateway(client, served, image, f"Q {i}?", 16), count,
                               args.clients)
            submit_jps = rate(lambda i: in_process(image, f"Q {i}?", 16), count, args.clients)
            figures["throughput_jobs_s"] = {"gateway": round(gateway_jps, 2), "submit": round(submit_jps, 2)}
            client.close()
        finally:
            gateway.terminate()
            idle.terminate()
            gateway.wait(15)
            idle.wait(15)
    figures["machine"] = f"{os.cpu_count()} CPU cores, tiny model on the CPU"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gateway.json").write_text(json.dumps(figures, indent=2))
    lat = figures["latency"]
    print(f"\n{args.jobs} jobs one at a time, alternating paths; {args.clients} clients for intake and throughput")
    print(f"  {'path':<10} {'wall median s':>14} {'overhead median ms':>19} {'p90 ms':>7} {'intake req/s':>13} "
          f"{'jobs/s':>7}")
    for path in ("submit", "gateway"):
        print(f"  {path:<10} {lat[path]['wall_median_s']:>14} {lat[path]['overhead_median_ms']:>19} "
              f"{lat[path]['overhead_p90_ms']:>7} {figures['intake_rps'][path]:>13} "
              f"{figures['throughput_jobs_s'][path]:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
