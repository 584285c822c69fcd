"""Load test of ``serve.py``: real films from 1, 8 and 32 concurrent clients on loopback, dynamic batching
against one request at a time (``max_batch_size=1``) and against ``predict.py``'s code from one process.

    python benchmarks/serve_load.py                              # ckpt=pretrained, the fullres sample
    python benchmarks/serve_load.py --clients 1,8,32 --seconds 30 --films DIR [DIR ...] --out table.md

Each server is ``serve.py`` itself in its own process group, on a free port, its Hydra run folder in a
temporary directory (removed). The servers are all started first and take turns, each stopped (SIGSTOP)
while another is measured, in a rotating order, so that the machine's drifting load hits all alike. Every client is a thread with one keep-alive connection sending the films in turn as
the raw body; a cell runs ``--seconds`` (the requests in flight then finish and count). Throughput is
answered films per second of wall time; latency is per request, queueing included; an error is any
answer other than 200. ``predict.py`` is ``predict_files`` as ``run_predict`` calls it (batch 32, 2 loader
workers) on the same films, the model loaded beforehand. Prints a markdown table; writes nothing else
unless ``--out`` is given. Compare within one run: the machine's other load moves every number.

On a CPU shared with other work, run it with ``OMP_WAIT_POLICY=PASSIVE`` (the servers and the baseline
inherit it): OpenMP's default busy-waiting then makes every forward pass wait for descheduled threads,
a cost per pass that batching hides and that says nothing about serving (docs/serving.md, Performance).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_FILMS = [SHARED / "chest_xray_fullres_sample", SHARED / "chest_xray" / "val"]
EXTENSIONS = (".jpeg", ".jpg", ".png", ".dcm")


def find_films(folders: list[Path], limit: int) -> list[Path]:
    """Up to ``limit`` films from the first of ``folders`` that holds any (recursive, sorted)."""
    for folder in folders:
        films = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS)
        if films:
            return films[:limit]
    raise SystemExit(f"no films under {', '.join(map(str, folders))}; pass --films DIR")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    port: int
    batch: int  # the max_batch_size it says it uses (auto resolved)
    group: int  # its process group: stopped while another server is measured

    def pause(self) -> None:
        os.killpg(self.group, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.group, signal.SIGCONT)


@contextlib.contextmanager
def server(args: argparse.Namespace, max_batch_size: str) -> Iterator[Server]:
    """``serve.py`` on a free loopback port until the block ends, from the moment /health is 200."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="xray-serve-load-") as run_dir:
        command = [
            sys.executable,
            str(ROOT / "serve.py"),
            f"ckpt={args.ckpt}",
            f"port={port}",
            f"max_batch_size={max_batch_size}",
            f"batch_timeout={args.batch_timeout}",
            f"timeout={args.request_timeout}",
            f"hydra.run.dir={run_dir}",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        env.pop("XRAY_API_KEY", None)
        log = Path(run_dir) / "stdout.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 300
            while not _healthy(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"serve.py did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            found = re.search(r"batches of up to (\d+) requests", log.read_text())
            yield Server(port, int(found.group(1)) if found else -1, proc.pid)
        finally:  # Ctrl-C to its process group, then SIGTERM (a background job ignores SIGINT)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
            for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 20), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def load(
    port: int, films: list[tuple[str, bytes]], clients: int, seconds: float, timeout: float
) -> dict[str, Any]:
    """``clients`` threads posting films for ``seconds``: throughput, latency percentiles, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + seconds

    def client(k: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        i = k
        while time.perf_counter() < stop_at:
            name, data = films[i % len(films)]
            i += clients
            t0 = time.perf_counter()
            try:
                connection.request("POST", f"/predict?filename={name}", body=data)
                response = connection.getresponse()
                response.read()
                ok, what = response.status == 200, f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as err:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                ok, what = False, type(err).__name__
            with lock:
                (latencies.append(time.perf_counter() - t0) if ok else errors.append(what))
        connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")

    return {
        "films_s": len(latencies) / wall,
        "p50": pct(0.50),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "errors": len(errors),
        "n": len(latencies),
        "error_kinds": sorted(set(errors)),
    }


def predict_baseline(args: argparse.Namespace, paths: list[Path]) -> dict[str, Any]:
    """``predict_files`` as ``predict.py`` runs it, on the same films, the model loaded first."""
    sys.path.insert(0, str(ROOT / "src"))
    from xray.inference.predict import predict_files
    from xray.inference.predictor import load_predictor

    predictor = load_predictor(args.ckpt)
    predict_files(predictor, paths[:4], batch_size=32, num_workers=0, device="cpu")  # warm-up
    start = time.perf_counter()
    rows = predict_files(predictor, paths, batch_size=32, num_workers=2, device="cpu")
    wall = time.perf_counter() - start
    return {"films_s": len(rows) / wall, "errors": sum(1 for r in rows if not r.ok), "n": len(rows)}


def machine() -> str:
    name = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                name = row.split(":", 1)[1].strip()
                break
    load1 = os.getloadavg()[0]
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return f"{name}, {os.cpu_count()} cores, load average {load1:.1f} at the start, OMP_WAIT_POLICY {policy}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="pretrained")
    parser.add_argument("--films", type=Path, nargs="+", default=DEFAULT_FILMS)
    parser.add_argument("--max-films", type=int, default=32)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=30.0, help="per cell")
    parser.add_argument(
        "--batch-sizes",
        default="auto,16",
        help="max_batch_size of each batched server (auto: serve.py's own)",
    )
    parser.add_argument("--batch-timeout", type=float, default=0.05)
    parser.add_argument(
        "--request-timeout", type=float, default=300.0, help="serve.py timeout=, and the clients'"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    paths = find_films(args.films, args.max_films)
    films = [(p.name, p.read_bytes()) for p in paths]
    header = (
        f"{len(films)} films from {paths[0].parent.parent}, "
        f"mean {statistics.mean(len(d) for _, d in films) / 1024:.0f} KB; ckpt={args.ckpt}; {machine()}; "
        f"{args.seconds:g} s per cell; batch_timeout={args.batch_timeout:g} s"
    )
    print(header, flush=True)

    results: dict[tuple[str, int], dict[str, Any]] = {}
    single = "one at a time (max_batch_size=1)"
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        for size in [*args.batch_sizes.split(","), "1"]:
            started = stack.enter_context(server(args, size))
            load(started.port, films, 2, 6, args.request_timeout)  # warm-up: first batches, allocator pools
            started.pause()
            mode = f"batched, max_batch_size={size}" + (f" ({started.batch})" if size == "auto" else "")
            servers[single if size == "1" else mode] = started
        modes = list(servers)
        for i, n in enumerate(clients):  # the servers take turns, in a rotating order: drift cancels
            for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                servers[mode].resume()
                results[mode, n] = load(servers[mode].port, films, n, args.seconds, args.request_timeout)
                servers[mode].pause()
                print(f"{mode}, {n} clients: {results[mode, n]}", flush=True)
    batched = [m for m in modes if m != single]
    baseline = predict_baseline(args, paths)
    print(f"predict.py: {baseline}", flush=True)

    lines = [
        "| server | clients | films/s | p50 s | p95 s | p99 s | errors | answered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (mode, n), r in sorted(results.items(), key=lambda item: (modes.index(item[0][0]), item[0][1])):
        lines.append(
            f"| {mode} | {n} | {r['films_s']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | "
            f"{r['errors']} | {r['n']} |"
        )
    lines += [
        f"| predict.py (one process, batch 32) | - | {baseline['films_s']:.2f} | - | - | - | "
        f"{baseline['errors']} | {baseline['n']} |",
        "",
    ]
    for mode in batched:
        ratios = ", ".join(
            f"{n}: {results[mode, n]['films_s'] / results[single, n]['films_s']:.2f}x" for n in clients
        )
        vs_predict = results[mode, clients[-1]]["films_s"] / baseline["films_s"]
        lines.append(
            f"- {mode} / one at a time, by clients: {ratios}; at {clients[-1]} clients / predict.py: {vs_predict:.2f}x"
        )
    table = "\n".join([header, "", *lines])
    print("\n" + table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
