"""``gradmap serve`` under load: requests/s and latency at fixed concurrency, against ``gradmap run``,
and soaks that show memory staying flat.

    python bench/bench_serve.py --resnet18 resnet18.onnx              # sweep + both 10-minute soaks
    python bench/bench_serve.py --resnet18 resnet18.onnx --quick      # a few seconds per step
    python bench/bench_serve.py --tables-only                         # docs/serve.md's table from the JSON

Run it with a Python that has ``gradmap[serve,test]`` (httpx is the load client); the resnet18 model
is ``gradmap export resnet18 --weights none -o resnet18.onnx`` (seeded random weights: its speed is
a trained model's). Traffic goes to 127.0.0.1 only; every loop is bounded in requests and time.

- Pictures: skimage's four photographs (chelsea, coffee, astronaut, rocket) as JPEG, quality 90.
- ``gradmap run``'s batch throughput: ``gradmap run MODEL FOLDER --format npy --batch-size 8`` on
  N1 and N2 copies of those pictures, fresh processes; rate = (N2 - N1) / (t(N2) - t(N1)), so the
  model's load time drops out. The server answers the same work (``format=map``: predictions and
  the map as float32) over HTTP.
- Sweep: for each model, a fresh ``gradmap serve`` (one process, defaults) with dynamic batching
  (``--max-batch 8``) and without (``--max-batch 1``); at 1, 8 and 32 concurrent clients (an httpx
  asyncio client, one connection each, a new request as soon as the last answered) for
  ``--seconds`` each after a short warm-up: requests/s, p50/p95/p99 latency, failures.
- Soaks: ``--soak-seconds`` at 32 clients on resnet18, RSS of the server's processes sampled every
  5 s; then the same with 20 % bad requests (non-pictures, truncated JPEGs, decompression-bomb
  headers, wrong JSON, unknown models and methods), each of which must get its 4xx.

The load client shares the machine's cores with the server, and this machine is shared with other
work: the load average is recorded beside every figure. Writes bench/results/serve.json (through
bench/_report.py: ``{"meta", "rows"}``, a row per sweep step, with ``gradmap_run``, ``soaks`` and
``soaks_before_fix`` beside them) and the generated section ``serve`` of docs/serve.md. A run that
keeps part of the previous results (``--skip-sweep``, ``--soaks clean|bad``, ``--skip-soak``) names
what it re-measured and the earlier run in the table's "Ran on:" header.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import _report

ROOT = _report.ROOT
DEMO = ROOT / "models" / "demo" / "shapes.onnx"
RESULTS = _report.RESULTS / "serve.json"
PAGE, SECTIONS = "serve.md", ("serve",)
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def photographs() -> list[bytes]:
    from skimage import data

    out = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- gradmap run's batch throughput ------------------------------------------------------------------
def run_rate(model: Path, pictures: list[bytes], n1: int, n2: int) -> dict:
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (n1, n2):
            folder = Path(tmp) / f"in{n}"
            folder.mkdir()
            for i in range(n):
                (folder / f"p{i:04d}.jpg").write_bytes(pictures[i % len(pictures)])
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "gradmap.cli", "run", str(model), str(folder), "--out",
                            str(Path(tmp) / f"out{n}"), "--format", "npy", "--batch-size", "8", "--provider", "cpu"],
                           check=True, capture_output=True, cwd=ROOT)
            times[n] = time.monotonic() - started
    return {"pictures": [n1, n2], "seconds": [round(times[n1], 3), round(times[n2], 3)],
            "rate": round((n2 - n1) / (times[n2] - times[n1]), 2), "loadavg": loadavg()}


# -- the server ------------------------------------------------------------------------------------
class Server:
    def __init__(self, models: dict[str, Path], *args: str) -> None:
        cmd = [sys.executable, "-m", "gradmap.cli", "serve", *map(str, models.values()), "--port", "0",
               "--log-level", "warning", *[a for name in models for a in ("--name", name)], *args]
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.port = None
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.lines.append(line)
                found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
                if found and self.port is None:
                    self.port = int(found.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or self.port is None:
            self.process.kill()
            raise RuntimeError("gradmap serve did not start:\n" + "".join(self.lines))

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of the supervisor and each worker, MB."""
        out = {}
        pids = [self.process.pid] + [int(p) for p in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
                                     .read_text().split()]
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if pid != self.process.pid and b"spawn_main" not in cmdline:
                continue  # multiprocessing's resource tracker
            kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
            out["supervisor" if pid == self.process.pid else f"worker {pid}"] = round(kb / 1024, 1)
        return out

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def bad_requests(model: str, picture: bytes) -> list[tuple[str, str, dict, int]]:
    """(name, path, httpx keywords, expected status) of the soak's bad requests."""
    b64 = base64.b64encode(picture).decode()
    return [
        ("not a picture", f"/explain/{model}", {"content": b"%PDF-1.4 not a picture " * 50}, 415),
        ("truncated JPEG", f"/explain/{model}", {"content": picture[:len(picture) // 3]}, 422),
        ("decompression bomb", f"/explain/{model}", {"content": _png_claiming(50000, 50000)}, 413),
        ("wrong JSON", f"/v1/models/{model}:explain", {"content": b'{"instances": [{"image": '}, 400),
        ("unknown model", "/v1/models/no-such-model:explain", {"json": {"instances": [{"image": {"b64": b64}}]}}, 404),
        ("unknown method", f"/explain/{model}?method=lime", {"content": picture}, 400),
    ]


async def load(port: int, model: str, pictures: list[bytes], clients: int, seconds: float, *,
               bad_every: int = 0, max_requests: int = 1_000_000, on_tick=None) -> dict:
    """``clients`` loops of request-after-answer for ``seconds``; every ``bad_every``-th request is bad."""
    import httpx

    bad = bad_requests(model, pictures[0])
    latencies: list[float] = []
    failures: dict[str, int] = {}
    good = bad_ok = 0
    stop_at = time.monotonic() + seconds
    sent = 0

    async def loop(client: "httpx.AsyncClient", i: int) -> None:
        nonlocal sent, good, bad_ok
        while time.monotonic() < stop_at and sent < max_requests:
            n = sent
            sent += 1
            if bad_every and n % bad_every == bad_every - 1:
                name, path, kwargs, status = bad[(n // bad_every) % len(bad)]
            else:
                name, path, kwargs, status = "good", f"/explain/{model}", {"content": pictures[n % len(pictures)]}, 200
            started = time.monotonic()
            try:
                answer = await client.post(path, **kwargs)
                code = answer.status_code
                ok = code == status and (code != 200 or answer.json()["maps"])
            except Exception as e:  # noqa: BLE001 -- a failure to count, whatever it is
                code, ok = type(e).__name__, False
            if name == "good":
                latencies.append(time.monotonic() - started)
            if not ok:
                key = f"{name}: {code}"
                failures[key] = failures.get(key, 0) + 1
            elif name == "good":
                good += 1
            else:
                bad_ok += 1

    async def ticker() -> None:
        while time.monotonic() < stop_at:
            await asyncio.sleep(5)
            on_tick()

    started = time.monotonic()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as client:
        tasks = [loop(client, i) for i in range(clients)]
        if on_tick is not None:
            tasks.append(ticker())
        await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    q = np.percentile(latencies, [50, 95, 99]) * 1000 if latencies else [float("nan")] * 3
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": sent, "good_answered": good,
            "bad_answered_as_expected": bad_ok, "failures": failures,
            "requests_per_s": round(good / elapsed, 2), "p50_ms": round(q[0], 1), "p95_ms": round(q[1], 1),
            "p99_ms": round(q[2], 1), "loadavg": loadavg()}


def batch_mean(port: int, model: str) -> float | None:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    count = sum(float(v) for v in re.findall(rf'^gradmap_batch_size_count\{{model="{model}"\}} (\S+)$', text, re.M))
    total = sum(float(v) for v in re.findall(rf'^gradmap_batch_size_sum\{{model="{model}"\}} (\S+)$', text, re.M))
    return round(total / count, 2) if count else None


def sweep(models: dict[str, Path], pictures: list[bytes], levels: list[int], seconds: float) -> list[dict]:
    rows = []
    for name, path in models.items():
        for batching, args in (("on", ["--max-batch", "8"]), ("off", ["--max-batch", "1"])):
            server = Server({name: path}, *args)
            try:
                asyncio.run(load(server.port, name, pictures, 4, 3, max_requests=40))  # warm-up
                for clients in levels:
                    before = batch_mean(server.port, name)
                    row = asyncio.run(load(server.port, name, pictures, clients, seconds))
                    row.update(model=name, batching=batching, mean_batch_all=batch_mean(server.port, name),
                               mean_batch_before=before)
                    print(f"{name} batching {batching} {clients:>2} clients: {row['requests_per_s']:.1f} req/s, "
                          f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, failures {row['failures']}, "
                          f"load {row['loadavg']}", flush=True)
                    rows.append(row)
            finally:
                server.stop()
    return rows


def soak(name: str, path: Path, pictures: list[bytes], seconds: float, bad_every: int) -> dict:
    server = Server({name: path}, "--max-batch", "8")
    samples: list[dict] = []
    started = time.monotonic()

    def tick() -> None:
        samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": server.rss_mb(), "loadavg": loadavg()})

    try:
        tick()
        row = asyncio.run(load(server.port, name, pictures, 32, seconds, bad_every=bad_every, on_tick=tick))
        tick()
    finally:
        code = server.stop()
    workers = [k for k in samples[-1]["rss_mb"] if k.startswith("worker")]
    series = [s["rss_mb"].get(workers[0]) for s in samples if workers and workers[0] in s["rss_mb"]]
    after_minute = [v for s, v in zip(samples, series) if s["t"] >= 60] or series
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    row.update(model=name, bad_share=round(1 / bad_every, 2) if bad_every else 0.0, samples=samples,
               commit=commit.strip(),
               exit_code=code, worker_rss_mb={"start": series[0], "at_1_min": after_minute[0], "end": series[-1],
                                              "max": max(series), "growth_after_1_min": round(series[-1] - after_minute[0], 1)})
    print(f"soak {name} bad {row['bad_share']:.0%}: {row['requests_per_s']} req/s, failures {row['failures']}, "
          f"worker RSS {row['worker_rss_mb']}", flush=True)
    return row


# -- the docs table ---------------------------------------------------------------------------------
def render(results: dict) -> str:
    meta = results["meta"]
    lines = [_report.machine_line(meta), "",
             f"{_report.cores(meta) or 'All the'} cores shared with the load client and with other work on this "
             "machine (load average beside each row: 1, 5, 15 min). One server process, onnxruntime's default "
             "threads; responses carry the top-5 classes and the map as float32 (`format=map`). From "
             "`bench/bench_serve.py`" + (" (--quick: short steps, not the full run)" if meta.get("quick") else "")
             + ".", ""]
    lines += _report.table(
        ["model", "batching", "clients", "requests/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "failures",
         "load avg"],
        [[row["model"], row["batching"], row["clients"], f"{row['requests_per_s']:.1f}", f"{row['p50_ms']:.0f}",
          f"{row['p95_ms']:.0f}", f"{row['p99_ms']:.0f}",
          row["mean_batch_all"] if row["mean_batch_all"] is not None else "-", sum(row["failures"].values()),
          " / ".join(map(str, row["loadavg"]))] for row in results["rows"]])
    lines.append("")
    for row in results["rows"]:
        if row["failures"]:
            said = ", ".join(f"{n} x {what}" for what, n in row["failures"].items())
            lines.append(f"- Failures, {row['model']}, batching {row['batching']}, {row['clients']} clients: {said} "
                         "(504: the request timeout, 30 s, passed while the picture waited its turn)"
                         if set(row["failures"]) == {"good: 504"} else
                         f"- Failures, {row['model']}, batching {row['batching']}, {row['clients']} clients: {said}")
    for name, run in results["gradmap_run"].items():
        best = max((r for r in results["rows"] if r["model"] == name and r["clients"] == 32),
                   key=lambda r: r["requests_per_s"], default=None)
        if best is None:
            continue
        ratio = best["requests_per_s"] / run["rate"]
        verdict = ("meets" if ratio >= 0.9 else "misses") if name == "resnet18" else "(no target: the client dominates)"
        lines.append(f"- {name}: `gradmap run --batch-size 8` explains {run['rate']:.1f} pictures/s on the same "
                     f"pictures (load {' / '.join(map(str, run['loadavg']))}); the server at 32 clients with "
                     f"batching {best['batching']} answers {best['requests_per_s']:.1f}/s, {ratio:.0%} of it: "
                     f"{verdict} the 90 % target." if name == "resnet18" else
                     f"- {name}: `gradmap run --batch-size 8` explains {run['rate']:.1f} pictures/s; the server at 32 "
                     f"clients {best['requests_per_s']:.1f}/s ({ratio:.0%}) {verdict}.")
    for row in results.get("soaks", []):
        rss = row["worker_rss_mb"]
        failures = sum(row["failures"].values())
        minutes = [f"{s['t'] / 60:.0f} min {s['rss_mb'].get(next(k for k in s['rss_mb'] if k.startswith('worker')), 0):.0f}"
                   for s in row["samples"] if any(k.startswith("worker") for k in s["rss_mb"])][::12]
        lines.append(f"- Soak{' (commit ' + row['commit'] + ')' if row.get('commit') else ''}, {row['model']}, "
                     f"32 clients, {row['seconds'] / 60:.1f} min, {row['bad_share']:.0%} bad "
                     f"requests: {row['good_answered']} good answered ({row['requests_per_s']:.1f}/s), "
                     f"{row['bad_answered_as_expected']} bad ones each refused with its 4xx, {failures} failures"
                     f"{' ' + json.dumps(row['failures']) if failures else ''}; worker RSS {rss['start']:.0f} MB at "
                     f"start, {rss['at_1_min']:.0f} after a minute, {rss['end']:.0f} at the end (max {rss['max']:.0f}; "
                     f"MB by minute: {', '.join(minutes)}); load average at the end "
                     f"{' / '.join(map(str, row['loadavg']))}.")
    for row in results.get("soaks_before_fix", []):
        rss = row["worker_rss_mb"]
        lines.append(f"- The same soak at commit {row['commit']}, before failed pictures were freed at once (they "
                     f"waited in reference cycles for the garbage collector): worker RSS {rss['at_1_min']:.0f} MB "
                     f"after a minute, {rss['end']:.0f} at the end, still growing; {sum(row['failures'].values())} "
                     "failures.")
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"serve": render(data)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet18", type=Path, help="resnet18 exported by gradmap export (--weights none)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--skip-soak", action="store_true", help="keep the soaks of the existing results file")
    parser.add_argument("--soaks", choices=["both", "clean", "bad"], default="both",
                        help="which soaks to run; the other keeps its figures from the existing results file")
    parser.add_argument("--skip-sweep", action="store_true", help="keep the sweep of the existing results file")
    parser.add_argument("--quick", action="store_true", help="3 s per level, 20 s soaks: a smoke run")
    _report.add_flags(parser, RESULTS)
    args = _report.parse_args(parser)
    _report.render_or_measure(args, PAGE, sections, lambda: measure(args))


def measure(args: argparse.Namespace) -> dict:
    if args.quick:
        args.seconds, args.soak_seconds = 3.0, 20.0
    models = {"demo": DEMO}
    if args.resnet18:
        models["resnet18"] = args.resnet18.resolve()
    pictures = photographs()
    previous = _report.read_results(args.out) if args.out.exists() else None
    meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "starlette", "uvicorn", "httpx"),
                             quick=args.quick, seconds_per_level=args.seconds, soak_seconds=args.soak_seconds)
    remeasured: list[str] = []  # what this run measured
    kept = False  # whether some figures come from the previous results file
    extra: dict = {}
    if args.skip_sweep and previous:
        extra["gradmap_run"], rows = previous["gradmap_run"], previous["rows"]
        kept = True
    else:
        n1, n2 = (8, 24) if args.quick else (16, 80)
        extra["gradmap_run"] = {name: run_rate(path, pictures, n1, n2) for name, path in models.items()}
        print("gradmap run:", extra["gradmap_run"], flush=True)
        rows = sweep(models, pictures, [int(c) for c in args.levels.split(",")], args.seconds)
        remeasured.append("the sweep and gradmap run's rates")
    earlier_soaks = {row["bad_share"]: row for row in (previous or {}).get("soaks", [])}
    extra["soaks"] = []
    name = "resnet18" if "resnet18" in models else "demo"
    for kind, every, share in (("clean", 0, 0.0), ("bad", 5, 0.2)):
        if not args.skip_soak and args.soaks in ("both", kind):
            extra["soaks"].append(soak(name, models[name], pictures, args.soak_seconds, every))
            remeasured.append(f"the soak with {share:.0%} bad requests")
        elif share in earlier_soaks:
            extra["soaks"].append(earlier_soaks[share])
            kept = True
    if previous and previous.get("soaks_before_fix"):
        extra["soaks_before_fix"] = previous["soaks_before_fix"]
    if kept:
        meta = _report.merge_update(meta, previous["meta"], remeasured)
    data = _report.write_results(args.out, meta, rows, **extra)
    print(f"wrote {args.out}")
    return data


if __name__ == "__main__":
    main()
