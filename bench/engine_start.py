"""How fast a GPU child starts from a preloaded parent: ``fork`` against ``forkserver`` (issue 25).

    python3 bench/engine_start.py --out DIR [--model-dir DIR] [--rounds 3] [--no-prime]

This process plays the worker's main process: it calls ``worker.runtime.preload_modules`` (torch,
transformers and the engine's modules; CUDA untouched), then starts children with public
``multiprocessing``, one at a time, alternating the start methods, ``--rounds`` times each. A child
gets everything as arguments (the write end of a pipe, the model folder, the ``GLYPHQ_*`` settings),
imports what it needs, touches the device (CUDA's initialisation), loads the engine with
``worker.engine.load``, answers the warm-up (``engine.warm_up(settings.max_image_size)``, two blank
pages), sends its own timings after the load and after the warm-up, and exits. This process times
each child from ``Process.start()`` to the "loaded" and "warmed" messages and to its exit.

``forkserver`` preloads the same modules in its server (``set_forkserver_preload``); its first
start launches the server and so is reported apart from the later ones. Before the rounds a first
child (``fork``, kept apart as ``prime``) fills the compile and bytecode caches, so that no method's
first start pays for a cold cache.

Default ``--model-dir``: ``/tmp/glyph-9b`` on a host with an NVIDIA GPU (the ``glyph-9b`` preset is
saved there if no model is), else the ``tiny`` preset in a temporary folder (a smoke check of the
code path on a CPU, not a measurement).

Prints one table last and writes ``engine_start.json`` (every child's figures, the device, torch's
version, the start methods) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Light imports only at the top: a forkserver child runs this file again (as ``__mp_main__``).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("fork", "forkserver")
CHILD_TIMEOUT_S = 600
#: Seconds a child may take to exit after its last message before it is killed (and the round failed).
EXIT_TIMEOUT_S = 120


def engine_child(conn: Any, model_dir: str, env: dict[str, str], preload: tuple[str, ...]) -> None:
    """A GPU child: load the engine of ``model_dir`` with the settings of ``env`` and warm it up, sending
    its timings through ``conn`` ("loaded", then "warmed"; "error" if either fails)."""
    entered = time.time()
    started = time.perf_counter()
    preloaded = all(name in sys.modules for name in preload)
    try:
        os.environ.update(env)
        import torch

        from glyphq.celeryconfig import Settings
        from glyphq.worker.engine import load, resolve_device

        imports_s = time.perf_counter() - started
        settings = Settings.from_env({**os.environ, "GLYPHQ_MODEL": model_dir})
        device = resolve_device(settings.device)
        t = time.perf_counter()
        cuda_init_s = None
        if device.type == "cuda":
            torch.zeros(1, device=device)
            torch.cuda.synchronize(device)
            cuda_init_s = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        engine = load(settings)
        figures: dict[str, Any] = {"entered_at": entered, "preloaded": preloaded, "imports_s": round(imports_s, 3),
                                   "cuda_init_s": cuda_init_s, "load_s": round(time.perf_counter() - t, 3),
                                   "device": str(engine.device), "pid": os.getpid()}
        if device.type == "cuda":
            figures["device_name"] = torch.cuda.get_device_name(device)
        conn.send({"event": "loaded", **figures})
        figures["warm_up_s"] = round(engine.warm_up(settings.max_image_size), 3)
        figures["child_total_s"] = round(time.perf_counter() - started, 3)
        conn.send({"event": "warmed", **figures})
    except Exception as exc:  # noqa: BLE001  (the figure is which error)
        conn.send({"event": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]})
    finally:
        conn.close()


def start_one(method: str, model_dir: str, env: dict[str, str], preload: tuple[str, ...]) -> dict[str, Any]:
    """Start one child with ``method`` and time it: the wall seconds from ``Process.start()`` to its
    "loaded" and "warmed" messages and to its exit, with the child's own figures."""
    import multiprocessing

    ctx: Any = multiprocessing.get_context(method)  # typeshed's BaseContext has no Process
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=engine_child, args=(writer, model_dir, env, preload), name=f"GpuChild-{method}")
    wall_at = time.time()
    started = time.perf_counter()
    child.start()
    found: dict[str, Any] = {"method": method, "start_call_s": round(time.perf_counter() - started, 3)}
    writer.close()  # the child holds the only write end: a child that dies reads as EOF here
    deadline = started + CHILD_TIMEOUT_S
    try:
        while time.perf_counter() < deadline and reader.poll(max(0.0, deadline - time.perf_counter())):
            message = reader.recv()
            at = round(time.perf_counter() - started, 3)
            event = message.pop("event")
            if event == "error":
                found["error"] = message["error"]
                break
            found[f"{event}_s"] = at
            found["child"] = message
            if event == "warmed":
                break
    except EOFError:
        found.setdefault("error", "the child left without a word")
    child.join(EXIT_TIMEOUT_S)
    found["exited_s"] = round(time.perf_counter() - started, 3)
    if child.is_alive():
        child.kill()
        child.join()
        found.setdefault("error", f"still running {EXIT_TIMEOUT_S} s after its last message: killed")
    found["exitcode"] = child.exitcode
    if "child" in found:
        found["child"]["entry_s"] = round(found["child"].pop("entered_at") - wall_at, 3)
    if "warmed_s" not in found:
        found.setdefault("error", f"no warm-up within {CHILD_TIMEOUT_S} s (exit code {child.exitcode})")
    reader.close()
    return found


def summary(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: the first start, and the median of the later ones, to "loaded" and to "warmed"."""
    out: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        runs = [r for r in rounds if r["method"] == method]
        later = [r for r in runs[1:] if "warmed_s" in r]
        out[method] = {
            "first_loaded_s": runs[0].get("loaded_s") if runs else None,
            "first_warmed_s": runs[0].get("warmed_s") if runs else None,
            "later_loaded_s_median": round(statistics.median(r["loaded_s"] for r in later), 3) if later else None,
            "later_warmed_s_median": round(statistics.median(r["warmed_s"] for r in later), 3) if later else None,
            "later": len(later),
            "failed": sum(1 for r in runs if "error" in r),
        }
    return out


def model_folder(args: argparse.Namespace, gpu: bool) -> str:
    """``--model-dir``, or the default for this host; the preset is saved there if no model is."""
    from bench.gpu_soak import ensure_preset

    model_dir = args.model_dir or ("/tmp/glyph-9b" if gpu else tempfile.mkdtemp(prefix="glyphq-tiny-"))
    ensure_preset(model_dir, "glyph-9b" if gpu else "tiny")
    return model_dir


def measure(args: argparse.Namespace, device: str, model_dir: str) -> int:
    """Preload as a worker's main process does, start every child, print the table, write the JSON."""
    import multiprocessing

    os.environ.setdefault("GLYPHQ_COMPILE_CACHE_DIR", os.path.join(tempfile.gettempdir(), "glyphq-inductor"))
    if not sys.dont_write_bytecode:
        # A bytecode cache, as an installed image has: the GPU host's Python has none for torch, and the
        # forkserver's server imports torch afresh. This process fills it as it preloads.
        os.environ.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), "glyphq-pycache"))
        sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]
    env = {key: value for key, value in os.environ.items() if key.startswith("GLYPHQ_")}

    started = time.perf_counter()
    from glyphq.worker.runtime import PRELOADED_MODULES, preload_modules

    preload_modules()
    preload_s = round(time.perf_counter() - started, 2)
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOADED_MODULES))

    import torch
    import transformers

    figures: dict[str, Any] = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
                               "python": sys.version.split()[0], "methods": list(METHODS), "model_dir": model_dir,
                               "forkserver_preload": list(PRELOADED_MODULES), "parent_preload_s": preload_s,
                               "compile_cache_dir": env["GLYPHQ_COMPILE_CACHE_DIR"],
                               "pycache_prefix": sys.pycache_prefix}
    if args.prime:
        figures["prime"] = start_one("fork", model_dir, env, PRELOADED_MODULES)
        print("prime (fork):", json.dumps(figures["prime"]), flush=True)
    rounds: list[dict[str, Any]] = []
    for index in range(args.rounds):
        for method in METHODS:
            found = {"round": index, **start_one(method, model_dir, env, PRELOADED_MODULES)}
            rounds.append(found)
            print(f"round {index} {method}:", json.dumps(found), flush=True)
    figures["rounds"] = rounds
    figures["summary"] = summary(rounds)
    figures["parent_cuda_initialized"] = torch.cuda.is_initialized()  # must stay False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_start.json").write_text(json.dumps(figures, indent=2) + "\n")

    names = {r["child"].get("device_name") or r["child"]["device"] for r in rounds if "child" in r}
    print(f"\nA GPU child's start from a preloaded parent ({', '.join(sorted(names)) or device}, "
          f"torch {torch.__version__}; seconds from Process.start(); parent touched CUDA: "
          f"{figures['parent_cuda_initialized']})")
    print(f"  {'method':<11} {'first: loaded':>14} {'warmed':>8}   {'later median: loaded':>21} {'warmed':>8}  later")
    for method, row in figures["summary"].items():
        failed = f"  ({row['failed']} failed)" if row["failed"] else ""
        print(f"  {method:<11} {row['first_loaded_s']!s:>14} {row['first_warmed_s']!s:>8}   "
              f"{row['later_loaded_s_median']!s:>21} {row['later_warmed_s_median']!s:>8}  {row['later']}{failed}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default="", help="default: /tmp/glyph-9b on a GPU host, else a tiny model")
    parser.add_argument("--rounds", type=int, default=3, help="children per start method")
    parser.add_argument("--prime", action=argparse.BooleanOptionalAction, default=True,
                        help="a first child that fills the compile and bytecode caches, kept apart")
    args = parser.parse_args()

    from bench.gpu_paged import device_name

    device = device_name()  # nvidia-smi: this process never touches CUDA
    model_dir = model_folder(args, gpu=device != "cpu")
    try:
        return measure(args, device, model_dir)
    finally:
        if not args.model_dir and device == "cpu":
            shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
