"""`gradmap serve --engine ray`: the same app on Ray Serve, on a local Ray of 2 CPUs with 2 replicas
of half a CPU each, spoken to over HTTP on 127.0.0.1: the numbers of `gradmap run`, both replicas
serving, bad input refused with its 4xx, and a shutdown that answers the requests in flight.

Needs the [serve-ray] extra; skipped without it, except in CI (CI=true), where it must be there.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "demo" / "shapes.onnx"
PICTURES = sorted((REPO / "models" / "demo" / "images").glob("*.png"))


def _import():
    try:
        import httpx
        import ray
        from ray import serve  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Ray Serve is not installed ({e}); CI must run this test: pip install '.[serve-ray,test]'")
        pytest.skip(f"Ray Serve is not installed ({e}): pip install 'gradmap[serve-ray]'")
    return ray, httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_pids() -> list[int]:
    """Processes of the deployment's replicas (Ray titles them ray::ServeReplica:APP:DEPLOYMENT)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::ServeReplica:gradmap:gradmap"):
                pids.append(int(entry.name))
    return pids


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ray_serve_two_fractional_replicas(tmp_path):
    ray, httpx = _import()
    from ray import serve

    from gradmap.cli import main
    from gradmap.serve import Limits, ServeConfig
    from gradmap.serve.ray_serve import run_ray_serve

    assert not ray.is_initialized(), "another test left Ray running"
    ray.init(num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False, logging_level=logging.WARNING)
    port, stop, listening, failure = _free_port(), threading.Event(), threading.Event(), []
    config = ServeConfig({"shapes": str(DEMO_MODEL)}, Limits(max_batch=4))

    def run() -> None:
        try:
            run_ray_serve(config, port=port, replicas=2, replica_cpus=0.5, on_listening=lambda p: listening.set(),
                          stop=stop)
        except BaseException as e:  # noqa: BLE001 -- reported by the test
            failure.append(e)
            listening.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert listening.wait(300) and not failure, failure
        status = serve.status().applications["gradmap"]
        assert status.status == "RUNNING", status
        replicas = status.deployments["gradmap"].replica_states
        assert replicas.get("RUNNING") == 2, replicas

        out = tmp_path / "run"
        result = CliRunner().invoke(main, ["run", str(DEMO_MODEL), *map(str, PICTURES[:4]), "--out", str(out),
                                           "--format", "npy", "--batch-size", "1", "--json", "--provider", "cpu"])
        assert result.exit_code == 0, result.output
        records = {Path(r["path"]).name: r for r in json.loads(result.stdout)["images"]}
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        assert client.get("/v2/health/ready").json() == {"ready": True}
        for path in PICTURES[:4]:
            answer = client.post("/v1/models/shapes:explain", json={
                "instances": [{"image": {"b64": base64.b64encode(path.read_bytes()).decode()}}]})
            assert answer.status_code == 200, answer.text
            (explained,) = answer.json()["explanations"]
            record = records[path.name]
            assert explained["predictions"] == record["predictions"], path.name
            values = np.frombuffer(base64.b64decode(explained["maps"][0]["map"]["b64"]), "<f4").reshape(64, 64)
            assert np.array_equal(values, np.load(record["maps"][0]["files"]["map"])), path.name
        bad = client.post("/explain/shapes", content=b"not a picture" * 10)
        assert bad.status_code == 415 and "accepted format" in bad.json()["error"], bad.text

        # both replicas answer: concurrent requests are spread over them (each replica's CPU time grows)
        def explain(i: int) -> int:
            return client.post("/explain/shapes?method=smoothgrad&samples=20", content=PICTURES[i % 10].read_bytes()
                               ).status_code

        pids = _replica_pids()
        assert len(pids) == 2, pids
        before = {pid: _cpu_seconds(pid) for pid in pids}
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(explain, range(24))) == [200] * 24
        used = {pid: _cpu_seconds(pid) - before[pid] for pid in pids}
        assert all(seconds > 0.2 for seconds in used.values()), f"one replica did the work: {used}"

        # shutdown drains: a request in flight when the deployment is told to stop is answered
        with ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(explain, i) for i in range(2)]
            time.sleep(1.0)
            stop.set()
            assert [p.result(timeout=120) for p in pending] == [200, 200]
    finally:
        stop.set()
        thread.join(300)
        ray.shutdown()
    assert not failure, failure
