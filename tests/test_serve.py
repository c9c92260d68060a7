"""`gradmap serve` as its users meet it: a real server process on 127.0.0.1, spoken to over HTTP.

- every endpoint answers with the numbers, arrays and PNG bytes `gradmap run` writes for the same
  pictures and settings (bit for bit for a picture alone; within float32 noise inside a batch);
- bad input gets a 4xx JSON error naming the reason, and the server goes on serving;
- a full queue answers 503 with Retry-After; a slow request 504; slow clients 408;
- SIGTERM drains the requests in flight; a killed worker is restarted;
- a bounded load test (about 20 s, 16 clients): no failure, requests batched.

Needs the [serve] extra (starlette, uvicorn, prometheus-client) and httpx ([test]); skipped without
them, except in CI (CI=true), where they must be there. Every request goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "demo" / "shapes.onnx"
DEMO_PICTURES = sorted((REPO / "models" / "demo" / "images").glob("*.png"))


def _need_serve():
    try:
        import httpx  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the [serve] extra is missing ({e}); CI must run these tests: pip install '.[serve,test]'")
        pytest.skip(f"the [serve] extra is missing ({e}): pip install 'gradmap[serve,test]'", allow_module_level=True)


_need_serve()
import httpx  # noqa: E402


class Server:
    """``gradmap serve`` in a process of its own, on a port the OS picks, on 127.0.0.1."""

    def __init__(self, *args: str, models: tuple[str, ...] = (str(DEMO_MODEL),)) -> None:
        cmd = [sys.executable, "-m", "gradmap.cli", "serve", *models, "--port", "0", "--log-level", "warning", *args]
        self.process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.port: int | None = None
        started = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.lines.append(line)
                found = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
                if found:
                    self.port = int(found.group(1))
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(120) or self.port is None:
            self.process.kill()
            raise AssertionError("gradmap serve did not start:\n" + "".join(self.lines))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.fixture(scope="module")
def server():
    s = Server("--read-timeout", "2", "--max-body-mb", "1")
    yield s
    assert s.stop() == 0, s.log


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _array(doc: dict) -> np.ndarray:
    assert doc["dtype"] == "float32"
    return np.frombuffer(base64.b64decode(doc["b64"]), dtype="<f4").reshape(doc["shape"])


def _jpeg(seed: int, size: tuple[int, int] = (90, 70)) -> bytes:
    """A picture of the demo's kind, made different by a roll and a resize, as JPEG."""
    with Image.open(DEMO_PICTURES[seed % len(DEMO_PICTURES)]) as image:
        pixels = np.roll(np.asarray(image.convert("RGB")), 3 * seed, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize(size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _gradmap_run(folder: Path, out: Path, *args: str) -> dict:
    from gradmap.cli import main

    result = CliRunner().invoke(main, ["run", str(DEMO_MODEL), str(folder), "--out", str(out), "--provider", "cpu",
                                       "--json", *args])
    assert result.exit_code == 0, result.output
    return {Path(r["path"]).name: r for r in json.loads(result.stdout)["images"]}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve-pictures")
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(_jpeg(2 * i, (64 + 19 * i, 60 + 11 * i)))
    for path in DEMO_PICTURES[:1]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


SETTINGS = {
    "vanilla": {},
    "smoothgrad": {"method": "smoothgrad", "samples": 6, "noise": 0.2, "variant": "squared"},
    "integrated-gradients": {"method": "integrated-gradients", "steps": 8, "baseline": "blurred"},
    "grad-cam-top2": {"method": "grad-cam", "target": "top2"},
    "guided-backprop-label": {"method": "guided-backprop", "target": "square", "reduce": "sum"},
}


def _cli_args(settings: dict) -> list[str]:
    return [a for name, value in settings.items() for a in (f"--{name.replace('_', '-')}", str(value))]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_answers_carry_the_numbers_and_pictures_of_gradmap_run(server, pictures, tmp_path, name):
    """One picture per request (a batch of one) against `gradmap run --batch-size 1`: the same
    predictions, arrays bit for bit, and PNG bytes, through V1 :explain, /v2/.../infer and /explain."""
    settings = SETTINGS[name]
    records = _gradmap_run(pictures, tmp_path, "--format", "npy,heatmap,overlay,figure", "--batch-size", "1",
                           *_cli_args(settings))
    client = httpx.Client(base_url=server.url, timeout=60)
    for path in sorted(pictures.iterdir()):
        record = records[path.name]
        data = path.read_bytes()
        doc = client.post("/v1/models/shapes:explain", json={
            "instances": [{"image": {"b64": _b64(data)}}],
            "parameters": {**settings, "format": "map,attribution,heatmap,overlay,figure"}})
        assert doc.status_code == 200, doc.text
        (explained,) = doc.json()["explanations"]
        assert explained["predictions"] == record["predictions"], f"{path.name}: predictions differ"
        assert len(explained["maps"]) == len(record["maps"])
        for got, want in zip(explained["maps"], record["maps"]):
            assert got["target"] == want["target"] and got["rank"] == want["rank"], path.name
            assert got["method"] == want["method"] and got["completeness_gap"] == want["completeness_gap"]
            files = want["files"]
            kind = next(k for k in files if k.endswith(("gradient", "attribution", "cam")))
            assert np.array_equal(_array(got["map"]), np.load(files["map"])), f"{path.name}: map differs"
            assert np.array_equal(_array(got["attribution"]), np.load(files[kind])), f"{path.name}: {kind} differs"
            for picture in ("heatmap", "overlay", "figure"):
                assert base64.b64decode(got[picture]["b64"]) == Path(files[picture]).read_bytes(), \
                    f"{path.name}: {picture} PNG differs from gradmap run's file"
        if len(record["maps"]) == 1:
            png = client.post(f"/explain/shapes?format=overlay&{httpx.QueryParams(settings)}", content=data,
                              headers={"Accept": "image/png"})
            assert png.status_code == 200 and png.headers["content-type"] == "image/png", png.text
            assert png.content == Path(record["maps"][0]["files"]["overlay"]).read_bytes(), path.name
            assert png.headers["x-gradmap-class-index"] == str(record["maps"][0]["target"]["index"])
        v2 = client.post("/v2/models/shapes/infer", json={
            "id": "r1", "parameters": settings,
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64(data)]}],
            "outputs": [{"name": "saliency_map"}, {"name": "target_index"}, {"name": "predictions"}]})
        assert v2.status_code == 200, v2.text
        outputs = {o["name"]: o for o in v2.json()["outputs"]}
        assert v2.json()["id"] == "r1" and v2.json()["model_name"] == "shapes"
        k = len(record["maps"])
        assert outputs["saliency_map"]["datatype"] == "FP32" and outputs["saliency_map"]["shape"] == [1, k, 64, 64]
        maps = np.asarray(outputs["saliency_map"]["data"], dtype=np.float32).reshape(1, k, 64, 64)
        for r, want in enumerate(record["maps"]):
            assert np.array_equal(maps[0, r], np.load(want["files"]["map"])), f"{path.name}: V2 map differs"
        assert outputs["target_index"]["data"] == [m["target"]["index"] for m in record["maps"]]
        assert json.loads(outputs["predictions"]["data"][0])["predictions"] == record["predictions"]


def test_predict_and_batched_explanations_agree_with_gradmap_run(server, pictures, tmp_path):
    """Concurrent requests share model runs (the batch-size histogram shows it); their maps equal
    `gradmap run`'s within float32 noise, and :predict's classes are its classes."""
    records = _gradmap_run(pictures, tmp_path, "--format", "npy", "--batch-size", "8")
    paths = sorted(pictures.iterdir())
    before = _batch_stats(server)

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            explain = [client.post("/v1/models/shapes:explain", json={"instances": [{"image": {"b64": _b64(
                p.read_bytes())}}]}) for p in paths for _ in range(3)]
            predict = [client.post("/v1/models/shapes:predict", json={"instances": [
                {"image": {"b64": _b64(p.read_bytes())}} for p in paths]})]
            return await asyncio.gather(*explain, *predict)

    answers = asyncio.run(go())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    for i, answer in enumerate(answers[:-1]):
        path = paths[i // 3]
        (explained,) = answer.json()["explanations"]
        record = records[path.name]
        assert [p["index"] for p in explained["predictions"]] == [p["index"] for p in record["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in explained["predictions"]],
                                   [p["probability"] for p in record["predictions"]], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(_array(explained["maps"][0]["map"]), np.load(record["maps"][0]["files"]["map"]),
                                   atol=1e-5, err_msg=path.name)
    predictions = answers[-1].json()["predictions"]
    for path, predicted in zip(paths, predictions):
        record = records[path.name]
        assert [p["index"] for p in predicted["predictions"]] == [p["index"] for p in record["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in predicted["predictions"]],
                                   [p["probability"] for p in record["predictions"]], rtol=1e-5, atol=1e-7)
    count, total = (a - b for a, b in zip(_batch_stats(server), before))
    assert count < len(paths) * 3 + 1, f"{count} model runs for {len(paths) * 3 + 1} requests: nothing was batched"
    assert total == len(paths) * 4, "every picture went through one model run"


def _batch_stats(server) -> tuple[float, float]:
    text = httpx.get(server.url + "/metrics").text
    count = sum(float(v) for v in re.findall(r'^gradmap_batch_size_count\{model="shapes"\} (\S+)$', text, re.M))
    total = sum(float(v) for v in re.findall(r'^gradmap_batch_size_sum\{model="shapes"\} (\S+)$', text, re.M))
    return count, total


def test_health_metadata_and_metrics(server):
    client = httpx.Client(base_url=server.url, timeout=30)
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/shapes/ready").json()["ready"] is True
    assert client.get("/v1/models/shapes").json() == {"name": "shapes", "ready": True}
    meta = client.get("/v2/models/shapes").json()
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {"name": "saliency_map", "datatype": "FP32", "shape": [-1, -1, 64, 64]} in meta["outputs"]
    assert "smoothgrad" in meta["parameters"]["methods"]
    assert client.get("/v2").json()["name"] == "gradmap"
    text = client.get("/metrics").text
    for name in ("gradmap_requests_total", "gradmap_request_duration_seconds_bucket", "gradmap_batch_size_bucket",
                 "gradmap_queue_depth", "gradmap_failures_total"):
        assert name in text, f"/metrics lacks {name}"


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, followed by a few compressed rows only."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def _v1(data: bytes) -> dict:
    return {"instances": [{"image": {"b64": _b64(data)}}]}


GOOD = DEMO_PICTURES[0].read_bytes()
BAD_REQUESTS = {
    # name: (method, path, keyword arguments of httpx, status, words of the reason)
    "not-an-image": ("POST", "/explain/shapes", {"content": b"hello, not a picture" * 10}, 415, "accepted format"),
    "gif-not-accepted": ("POST", "/explain/shapes", {"content": b"GIF89a" + GOOD[6:]}, 415, "accepted format"),
    "truncated": ("POST", "/explain/shapes", {"content": GOOD[:150]}, 422, "cannot decode"),
    "empty-body": ("POST", "/explain/shapes", {"content": b""}, 422, "empty picture"),
    "decompression-bomb": ("POST", "/explain/shapes", {"content": _png_claiming(40000, 40000)}, 413,
                           "decompression bomb"),
    "bomb-in-v1": ("POST", "/v1/models/shapes:explain", {"json": _v1(_png_claiming(30000, 30000))}, 413,
                   "instances[0]: refused as a possible decompression bomb"),
    "body-over-limit": ("POST", "/explain/shapes", {"content": b"\xff" * (2 * 2**20)}, 413, "over this server's limit"),
    "invalid-json": ("POST", "/v1/models/shapes:explain", {"content": b'{"instances": [}'}, 400, "not valid JSON"),
    "json-array": ("POST", "/v1/models/shapes:explain", {"json": [1, 2]}, 400, "must be a JSON object"),
    "no-instances": ("POST", "/v1/models/shapes:explain", {"json": {"inputs": []}}, 400, "instances"),
    "bad-instance": ("POST", "/v1/models/shapes:explain", {"json": {"instances": [{"b64": "x"}]}}, 400,
                     "instances[0] must be"),
    "bad-base64": ("POST", "/v1/models/shapes:explain", {"json": {"instances": [{"image": {"b64": "@@@"}}]}}, 400,
                   "not valid base64"),
    "unknown-model": ("POST", "/v1/models/resnet:explain", {"json": _v1(GOOD)}, 404, "no model named 'resnet'"),
    "unknown-model-get": ("GET", "/v2/models/resnet", {}, 404, "no model named 'resnet'"),
    "unknown-method": ("POST", "/explain/shapes?method=lime", {"content": GOOD}, 400, "unknown method 'lime'"),
    "unknown-target": ("POST", "/explain/shapes?target=zebra", {"content": GOOD}, 400, "no class named 'zebra'"),
    "target-out-of-range": ("POST", "/explain/shapes?target=7", {"content": GOOD}, 400, "out of range"),
    "unknown-parameter": ("POST", "/explain/shapes?sample=5", {"content": GOOD}, 400, "unknown parameter 'sample'"),
    "wrong-type": ("POST", "/v1/models/shapes:explain", {"json": {**_v1(GOOD), "parameters": {
        "method": "smoothgrad", "samples": "many"}}}, 400, "smoothgrad setting 'samples' must be an integer >= 1"),
    "setting-of-another-method": ("POST", "/explain/shapes?method=integrated-gradients&samples=5",
                                  {"content": GOOD}, 400, "integrated-gradients has no setting 'samples'"),
    "too-many-passes": ("POST", "/explain/shapes?method=smoothgrad&samples=100000", {"content": GOOD}, 400,
                        "at most 256"),
    "bad-choice": ("POST", "/explain/shapes?method=smoothgrad&variant=loud", {"content": GOOD}, 400,
                   "'loud' is not one of plain, squared, vargrad"),
    "predict-settings": ("POST", "/v1/models/shapes:predict", {"json": {**_v1(GOOD), "parameters": {"method": "x"}}},
                         400, "predict takes no parameters"),
    "v2-wrong-input": ("POST", "/v2/models/shapes/infer", {"json": {"inputs": [
        {"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1.0]}]}}, 400, "one input \"image\""),
    "v2-shape": ("POST", "/v2/models/shapes/infer", {"json": {"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [3], "data": [_b64(GOOD)]}]}}, 400, "has shape [3]"),
    "v2-unknown-output": ("POST", "/v2/models/shapes/infer", {"json": {"outputs": [{"name": "logits"}], "inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(GOOD)]}]}}, 400, "unknown output 'logits'"),
    "png-for-top2": ("POST", "/explain/shapes?target=top2", {"content": GOOD, "headers": {"Accept": "image/png"}},
                     406, "one picture of one map"),
    "unknown-route": ("GET", "/v3/anything", {}, 404, "no endpoint"),
    "wrong-verb": ("GET", "/v1/models/shapes:explain", {}, 405, "not allowed"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_json_reason_and_the_server_goes_on(server, name):
    verb, path, kwargs, status, words = BAD_REQUESTS[name]
    client = httpx.Client(base_url=server.url, timeout=30)
    answer = client.request(verb, path, **kwargs)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json", answer.headers
    assert words in answer.json()["error"], answer.json()
    good = client.post("/explain/shapes", content=GOOD)
    assert good.status_code == 200 and good.json()["maps"], "the server must go on serving after a bad request"


def _raw(port: int, data: bytes, *, then: bytes = b"", wait: float = 0.0, read_for: float = 10.0) -> bytes:
    """Send ``data``, wait, send ``then``; return what the server answers before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as s:
        s.sendall(data)
        if wait:
            time.sleep(wait)
        if then:
            try:
                s.sendall(then)
            except OSError:
                pass
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
        return b"".join(chunks)


def test_oversized_bodies_are_refused_before_they_are_read(server):
    # Content-Length of 1 GiB: answered at once, without waiting for (or reading) the body
    started = time.monotonic()
    answer = _raw(server.port, b"POST /explain/shapes HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n"
                  + b"\0" * 1024)
    assert answer.startswith(b"HTTP/1.1 413") and b"over this server's limit" in answer, answer[:300]
    assert time.monotonic() - started < 5
    # chunked, no length: refused as soon as the limit is passed
    chunk = b"%x\r\n%s\r\n" % (256 * 1024, b"\0" * 256 * 1024)
    answer = _raw(server.port, b"POST /explain/shapes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunk * 5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]


def test_slow_clients_get_408_and_do_not_block_others(server):
    results = {}

    def slow_body():
        results["body"] = _raw(server.port, b"POST /explain/shapes HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
                               + GOOD[:100], wait=4, then=b"\0" * 10)

    def slow_headers():
        results["headers"] = _raw(server.port, b"POST /explain/shapes HTTP/1.1\r\nHost: x\r\n", wait=4,
                                  then=b"Content-Length: 0\r\n\r\n")

    threads = [threading.Thread(target=slow_body), threading.Thread(target=slow_headers)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert httpx.post(server.url + "/explain/shapes", content=GOOD, timeout=30).status_code == 200, \
        "a slow client must not hold up the others"
    for t in threads:
        t.join(30)
    assert results["body"].startswith(b"HTTP/1.1 408") and b"body did not arrive" in results["body"], results["body"]
    assert results["headers"].startswith(b"HTTP/1.1 408") and b"headers did not arrive" in results["headers"], \
        results["headers"]


def test_nothing_is_read_from_or_written_to_disk_per_request():
    """In this process, after startup: every way Python opens a file raises, and 20 requests (every
    endpoint, a bad picture among them) still answer."""
    import builtins
    import io as io_module

    from gradmap.serve import ServeConfig, create_app

    app = create_app(ServeConfig({"shapes": str(DEMO_MODEL)}))
    jpegs = [_jpeg(i) for i in range(5)]
    opened = []

    def refuse(*args, **kwargs):
        opened.append(args[:1])
        raise PermissionError(f"a request opened a file: {args[:1]}")

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gradmap") as client:
                saved = builtins.open, io_module.open, os.open
                builtins.open = io_module.open = os.open = refuse
                try:
                    answers = [await client.post("/explain/shapes?format=overlay,figure,map", content=j) for j in jpegs]
                    answers += [await client.post("/v1/models/shapes:explain", json=_v1(j)) for j in jpegs]
                    answers += [await client.post("/v1/models/shapes:predict", json=_v1(j)) for j in jpegs]
                    answers += [await client.post("/v2/models/shapes/infer", json={"inputs": [
                        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(j)]}]}) for j in jpegs[:4]]
                    answers += [await client.post("/explain/shapes", content=GOOD[:150])]
                finally:
                    builtins.open, io_module.open, os.open = saved
                return answers

    answers = asyncio.run(go())
    assert not opened, f"requests opened files: {opened}"
    assert [a.status_code for a in answers] == [200] * 19 + [422], [a.text[:200] for a in answers]


def test_full_queue_answers_503_with_retry_after():
    # only the queue limit may answer: a loaded machine must not turn waits into 504s or client timeouts
    server = Server("--max-queue", "2", "--max-batch", "1", "--request-timeout", "120")
    try:
        async def go():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                slow = "/explain/shapes?method=smoothgrad&samples=200"
                return await asyncio.gather(*[client.post(slow, content=_jpeg(i)) for i in range(12)])

        answers = asyncio.run(go())
        codes = sorted(a.status_code for a in answers)
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
        busy = next(a for a in answers if a.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
        # the queued requests may still be running: wait for them rather than httpx's 5 s default
        assert httpx.post(server.url + "/explain/shapes", content=GOOD, timeout=120).status_code == 200
        assert "gradmap_failures_total{reason=\"queue_full\"}" in httpx.get(server.url + "/metrics", timeout=60).text
    finally:
        assert server.stop() == 0, server.log


def test_slow_requests_time_out_with_504_and_the_server_goes_on():
    server = Server("--request-timeout", "0.3", "--max-batch", "1")
    try:
        answer = httpx.post(server.url + "/explain/shapes?method=smoothgrad&samples=256", content=_jpeg(1), timeout=60)
        assert answer.status_code == 504 and "longer than 0.3 s" in answer.json()["error"], answer.text
        # the model finishes the batch it was running (onnxruntime is not interrupted), then serves again
        deadline, codes = time.monotonic() + 60, []
        while time.monotonic() < deadline and 200 not in codes:
            codes.append(httpx.post(server.url + "/explain/shapes", content=GOOD, timeout=60).status_code)
        assert codes[-1] == 200 and set(codes) <= {200, 504}, codes
    finally:
        assert server.stop() == 0, server.log


def test_sigterm_drains_the_requests_in_flight():
    server = Server("--max-batch", "1", "--request-timeout", "120")
    results: list = []

    def request(i: int) -> None:
        try:
            results.append(httpx.post(server.url + "/explain/shapes?method=smoothgrad&samples=256", content=_jpeg(i),
                                      timeout=120).status_code)
        except httpx.HTTPError as e:
            results.append(repr(e))

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while not results and time.monotonic() < deadline:  # the first is answered: three run or wait
        time.sleep(0.01)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    in_flight = 4 - len(results)
    assert in_flight >= 2, f"only {in_flight} request(s) in flight at SIGTERM: use more work"
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/v2/health/live", timeout=5)  # no new connection once draining
    for t in threads:
        t.join(120)
    assert results == [200] * 4, f"requests in flight at SIGTERM must be answered: {results}"
    assert server.process.wait(60) == 0, server.log
    assert time.monotonic() - started < 60
    assert "drained and stopped" in server.log


def test_a_killed_worker_is_restarted_and_processes_share_metrics():
    server = Server("--processes", "2")
    try:
        pids = server.worker_pids()
        assert len(pids) == 2, server.log
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (len(server.worker_pids()) < 2 or pids[0] in server.worker_pids()):
            time.sleep(0.2)
        assert len(server.worker_pids()) == 2 and pids[0] not in server.worker_pids(), server.log
        ok = 0
        deadline = time.monotonic() + 90
        while ok < 10 and time.monotonic() < deadline:  # the new worker answers once its models are loaded
            try:
                ok += httpx.post(server.url + "/explain/shapes", content=GOOD, timeout=30).status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)
        assert ok == 10, server.log
        assert "starting another" in server.log
        text = httpx.get(server.url + "/metrics").text
        served = sum(float(v) for v in re.findall(r'^gradmap_requests_total\{endpoint="explain",model="shapes",'
                                                  r'status="200"\} (\S+)$', text, re.M))
        assert served >= 10, "/metrics must add up the processes' counts"
    finally:
        assert server.stop() == 0, server.log


def test_a_model_that_does_not_load_stops_the_server_with_its_reason(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    done = subprocess.run([sys.executable, "-m", "gradmap.cli", "serve", str(broken), "--port", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "not an ONNX model" in done.stderr and "could not load the models" in done.stderr
    assert "Traceback" not in done.stderr


def test_bounded_load_no_failure_and_batched():
    """16 clients for about 20 s (bounded in requests and time): every answer 200, batches formed."""
    server = Server("--max-batch", "8")
    try:
        bodies = [_jpeg(i, (80 + i, 72)) for i in range(16)]
        stop_at = time.monotonic() + 20

        async def client_loop(client, i, counts):
            n = 0
            while time.monotonic() < stop_at and n < 2000:
                answer = await client.post("/explain/shapes", content=bodies[(i + n) % len(bodies)])
                counts[answer.status_code] = counts.get(answer.status_code, 0) + 1
                n += 1

        async def go():
            counts: dict = {}
            async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                         limits=httpx.Limits(max_connections=16)) as client:
                await asyncio.gather(*[client_loop(client, i, counts) for i in range(16)])
            return counts

        counts = asyncio.run(go())
        assert set(counts) == {200} and counts[200] > 50, counts
        count, total = _batch_stats(server)
        assert total / count > 1.5, f"mean batch {total / count:.2f}: 16 clients must share model runs"
    finally:
        assert server.stop() == 0, server.log


def test_serve_imports_no_torch():
    script = ("import sys, gradmap.serve, gradmap.serve.server, gradmap.cli\n"
              "print('TORCH', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'ray')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "TORCH []" in done.stdout, done.stdout + done.stderr


def test_settings_are_gradmap_runs_options_and_the_method_tables_settings():
    import dataclasses

    from gradmap.runtime import SaliencyModel
    from gradmap.serve._settings import BadRequest, read_settings

    meta = SaliencyModel(DEMO_MODEL, provider="cpu", threads=1).metadata
    key, options = read_settings({"method": "smoothgrad", "samples": "7", "target": "circle"}, "shapes", meta,
                                 max_top=3, max_passes=10)
    assert (key.method.name, key.method.samples, key.target.value) == ("smoothgrad", 7, 0)
    assert options.outputs == ("map",)
    # settings the request leaves out (or sends as null) take the table's defaults: equal keys, one batch
    keys = [read_settings(p, "shapes", meta, max_top=3, max_passes=100)[0]
            for p in ({"method": "smoothgrad"}, {"method": "smoothgrad", "samples": 50, "seed": None})]
    assert keys[0] == keys[1] and keys[0].method.samples == 50
    plain = dataclasses.replace(meta, backprops=("vanilla",), cam_layer=None)
    for params, words, metadata in (
            ({"target": "top4"}, "at most top3", meta),
            ({"steps": 1, "method": "integrated-gradients"}, "integrated-gradients setting 'steps' must be an "
                                                              "integer >= 2, got 1", meta),
            ({"samples": 11, "method": "smoothgrad"}, "smoothgrad with samples=11 takes 11 model runs per picture; "
                                                      "this server allows at most 10 (--max-passes): send samples=10 "
                                                      "or less, or start the server with --max-passes 11 or more", meta),
            ({"samples": 3}, "vanilla has no setting 'samples'; its settings are modifier", meta),
            ({"method": "rise", "masks": 11}, "rise with masks=11 takes 11 model runs per picture; this server "
                                               "allows at most 10 (--max-passes)", meta),
            ({"method": "xrai", "steps": 6}, "xrai with steps=6 takes 12 model runs per picture (2 baselines x 6 "
                                              "steps); this server allows at most 10 (--max-passes): send steps=5 "
                                              "or less", meta),
            ({"method": "grad-cam"}, f"model 'shapes' does not support grad-cam (it supports {', '.join(plain.methods)}"
                                     "); export it with --cam-layer", plain),
            ({"method": ["smoothgrad"]}, "unknown method ['smoothgrad']", meta),
            ({"alpha": 2}, "in [0, 1]", meta), ({"format": "jpeg"}, "list some of", meta),
            ({"no_crop": "maybe"}, "true or false", meta),
            ({"method": "smoothgrad", "noise": "nan"}, "smoothgrad setting 'noise' must be a number >= 0, got 'nan'",
             meta),
            ({"modifier": True}, "vanilla setting 'modifier': True is not one of", meta)):
        with pytest.raises(BadRequest, match=re.escape(words)) as refused:
            read_settings(params, "shapes", metadata, max_top=3, max_passes=10)
        assert refused.value.status == 400


def test_requests_over_max_passes_are_refused_before_any_work(caplog):
    """--max-passes caps the model runs one picture takes, however a method counts them: RISE at its
    default 4000 masks, occlusion's windows on the model's input, Score-CAM's CAM-layer channels. The
    400 names the settings (the request's, or the method's defaults), the runs, the limit, the option
    that raises it and what the request may send instead; the server warns at startup of every
    method its defaults put over the limit and lists them in the model's metadata."""
    import logging

    from gradmap.serve import ServeConfig, create_app
    from gradmap.serve.config import Limits

    picture = DEMO_PICTURES[0].read_bytes()
    app = create_app(ServeConfig({"shapes": str(DEMO_MODEL)}, Limits(max_passes=100)))

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gradmap") as client:
                answers = {query: await client.post(f"/explain/shapes?{query}", content=picture) for query in (
                    "method=rise", "method=rise&masks=101", "method=occlusion&window=4&stride=4",
                    "method=occlusion&window=100", "method=score-cam", "method=guided-ig",
                    "method=rise&masks=100&mask_batch=50", "method=occlusion&window=16&stride=8")}
                answers["metadata"] = await client.get("/v2/models/shapes")
                return answers

    with caplog.at_level(logging.WARNING, logger="gradmap.serve.app"):
        answers = asyncio.run(go())
    refused = {
        "method=rise": "rise at its default masks=4000 takes 4000 model runs per picture; this server allows at "
                       "most 100 (--max-passes): send masks=100 or less, or start the server with --max-passes 4000 "
                       "or more",
        "method=rise&masks=101": "rise with masks=101 takes 101 model runs per picture; this server allows at most 100 "
                                 "(--max-passes): send masks=100 or less, or start the server with --max-passes 101",
        "method=occlusion&window=4&stride=4": "occlusion with window=4, stride=4 takes 256 model runs per picture (256 "
                                              "windows on the 64 x 64 input); this server allows at most 100 "
                                              "(--max-passes): send a larger window or stride, or start the server "
                                              "with --max-passes 256 or more",
        # a setting that does not fit the model is the client's error, not the server's (it was a 500)
        "method=occlusion&window=100": "occlusion window 100 is larger than the model's input 64x64",
        "method=score-cam": "score-cam takes 128 model runs per picture (one per channel of the CAM layer's 128); "
                            "this server allows at most 100 (--max-passes): start the server with --max-passes 128",
        "method=guided-ig": "guided-ig at its default steps=200 takes 200 model runs per picture",
    }
    for query, words in refused.items():
        answer = answers[query]
        assert answer.status_code == 400 and words in answer.json()["error"], (query, answer.status_code, answer.text)
    for query in ("method=rise&masks=100&mask_batch=50", "method=occlusion&window=16&stride=8"):
        assert answers[query].status_code == 200, (query, answers[query].text[:300])
    listed = answers["metadata"].json()["parameters"]
    assert listed["max_passes"] == 100
    assert set(listed["refused_at_default_settings"]) == {"rise", "score-cam", "guided-ig"}, listed
    assert listed["refused_at_default_settings"]["rise"] == refused["method=rise"]
    warned = [r.getMessage() for r in caplog.records if "at default settings will be refused" in r.getMessage()]
    assert len(warned) == 3 and any(refused["method=rise"] in w for w in warned), warned


def test_every_method_and_setting_of_the_table_is_accepted():
    """The server's parameters are the method table's: each method the model has, with each of its
    settings given as a query string would give it, gives the MethodSpec gradmap run builds."""
    from gradmap import contract
    from gradmap.runtime import SaliencyModel
    from gradmap.runtime.methods import MethodSpec
    from gradmap.serve._settings import KNOWN, BadRequest, read_settings

    meta = SaliencyModel(DEMO_MODEL, provider="cpu", threads=1).metadata
    assert set(contract.SETTINGS) <= set(KNOWN)
    # the demo CNN has every method except those reading a transformer's attention outputs
    attention = {contract.OUTPUT_ATTENTION, contract.OUTPUT_ATTENTION_GRADIENT}
    cnn_methods = {row.name for row in contract.METHOD_TABLE if not attention & set(row.outputs)}
    assert set(meta.methods) == cnn_methods, "the demo model should have every method a CNN can have"
    for row in contract.METHOD_TABLE:
        if row.name not in meta.methods:  # refused by name, as any method the model lacks
            with pytest.raises(BadRequest, match=row.name):
                read_settings({"method": row.name}, "shapes", meta, max_top=3, max_passes=256)
            continue
        for setting in row.all_settings:
            if setting.type == "choice":
                value = setting.choices[-1]
            elif setting.maximum is not None:  # inside a bounded range (RISE's probability is in [0, 1])
                value = (setting.minimum or 0) + (setting.maximum - (setting.minimum or 0)) / 2
                value = int(value) if setting.type == "int" else value
            else:
                value = (setting.minimum or 0) + 2
            # passes above any default (RISE's 4000 masks): the cap has its own test
            key, _ = read_settings({"method": row.name, setting.name: str(value)}, "shapes", meta,
                                   max_top=3, max_passes=100_000)
            assert key.method == MethodSpec(row.name, **{setting.name: value}), (row.name, setting.name)


_NEW_ROW = """    Method("scaled-gradient", KIND_GRADIENT, "a test's method", _GRADIENT_OUTPUTS, _METHODS + "model_gradient_method",
           settings=(Setting("scale", "float", 2.0, "factor.", minimum=0.5, maximum=10),)),
"""


def test_a_method_added_to_the_table_is_served(tmp_path):
    """A copy of the package with one more row in the method table (and nothing else changed): the
    server accepts the new method and its setting, and checks the setting's range from the row."""
    import shutil

    shutil.copytree(REPO / "gradmap", tmp_path / "gradmap", ignore=shutil.ignore_patterns("__pycache__"))
    table = tmp_path / "gradmap" / "contract.py"
    lines = table.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("METHOD_TABLE"))
    end = next(i for i in range(start, len(lines)) if lines[i] == ")\n")
    table.write_text("".join(lines[:end]) + _NEW_ROW + "".join(lines[end:]))
    script = f"""
import gradmap
from gradmap.runtime import SaliencyModel
from gradmap.serve._settings import BadRequest, read_settings
assert gradmap.__file__.startswith({str(tmp_path)!r}), gradmap.__file__
meta = SaliencyModel({str(DEMO_MODEL)!r}, provider="cpu", threads=1).metadata
key, _ = read_settings({{"method": "scaled-gradient", "scale": "2.5"}}, "shapes", meta, max_top=3, max_passes=8)
print("spec", key.method.name, key.method.scale)
for params in ({{"method": "scaled-gradient", "scale": 11}}, {{"method": "vanilla", "scale": 3}}):
    try:
        read_settings(params, "shapes", meta, max_top=3, max_passes=8)
    except BadRequest as e:
        print("refused", e.status, e.reason)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "spec scaled-gradient 2.5" in done.stdout, done.stdout
    assert "refused 400 scaled-gradient setting 'scale' must be a number in [0.5, 10], got 11" in done.stdout
    assert "refused 400 vanilla has no setting 'scale'" in done.stdout


def test_a_batch_whose_requests_all_timed_out_stops_between_model_runs(caplog):
    """A long request (RISE, 4000 masks, allowed by a raised --max-passes) that times out gets its 504,
    and its batch stops at the next model run instead of holding the model's thread to the end."""
    import logging

    from gradmap.serve import ServeConfig, create_app
    from gradmap.serve.config import Limits

    picture = DEMO_PICTURES[0].read_bytes()
    app = create_app(ServeConfig({"shapes": str(DEMO_MODEL)}, Limits(max_passes=4000, request_timeout=1.0)))

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gradmap") as client:
                slow = await client.post("/explain/shapes?method=rise&mask_batch=8", content=picture)
                for _ in range(600):  # the model's thread is free once the batch stopped
                    if any("stopped" in r.getMessage() for r in caplog.records):
                        break
                    await asyncio.sleep(0.1)
                after = await client.post("/explain/shapes", content=picture)
                return slow, after

    with caplog.at_level(logging.INFO, logger="gradmap.serve._batching"):
        slow, after = asyncio.run(go())
    assert slow.status_code == 504 and "--request-timeout" in slow.json()["error"], slow.text
    stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert len(stopped) == 1 and "every request in it was given up" in stopped[0], stopped
    runs = int(re.search(r"after (\d+) model runs", stopped[0]).group(1))
    assert runs < 4000 // 8, f"the batch ran {runs} of RISE's 500 runs of 8 masks before it stopped"
    assert after.status_code == 200, after.text


def test_batcher_runs_only_equal_keys_together_and_drops_callers_that_left():
    from gradmap.serve._batching import DynamicBatcher

    calls = []

    def run(key, items):
        calls.append((key, list(items)))
        time.sleep(0.05)
        return [ValueError(f"bad {i}") if i == 5 else f"{key}{i}" for i in items]

    async def go():
        batcher = DynamicBatcher(run, "m", max_batch=3, max_wait=0.02)
        batcher.start()
        keys = "aababaabbb"
        tasks = [asyncio.ensure_future(batcher.submit(k, i)) for i, k in enumerate(keys)]
        await asyncio.sleep(0)
        tasks[9].cancel()  # its caller left while it waited: it never runs
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return keys, results

    keys, results = asyncio.run(go())
    for i, (key, result) in enumerate(zip(keys, results)):
        if i == 9:
            assert isinstance(result, asyncio.CancelledError)
        elif i == 5:
            assert isinstance(result, ValueError), "a picture's own failure is its own result"
        else:
            assert result == f"{key}{i}"
    ran = [i for _, items in calls for i in items]
    assert sorted(ran) == list(range(9)), f"each picture runs once, the cancelled one never: {calls}"
    assert all(len(items) <= 3 and all(keys[i] == key for i in items) for key, items in calls), calls
    assert len(calls) < 9, "waiting pictures of one key must share runs"


def test_engine_ray_without_ray_says_how_to_install(monkeypatch):
    from gradmap.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    result = CliRunner().invoke(main, ["serve", str(DEMO_MODEL), "--engine", "ray"])
    assert result.exit_code == 1 and "pip install 'gradmap[serve-ray]'" in result.output, result.output


def test_a_failed_picture_is_freed_at_once_not_by_the_garbage_collector():
    """A picture that fails to decode leaves no error object alive once its request is answered: kept
    in a reference cycle, each held its partly decoded pixels until the cyclic collector ran (truncated
    12-megapixel JPEGs grew a worker by gigabytes)."""
    import gc

    from gradmap.runtime import ImageLoadError
    from gradmap.serve import ServeConfig, create_app

    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((600, 800, 3)) * 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=80)
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    app = create_app(ServeConfig({"shapes": str(DEMO_MODEL)}))

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gradmap") as client:
                gc.collect()
                gc.disable()
                try:
                    codes = [(await client.post("/explain/shapes", content=truncated)).status_code for _ in range(3)]
                    codes += [(await client.post("/v1/models/shapes:predict", json=_v1(truncated))).status_code]
                    # the model's thread may still be returning from the last batch (its finished work item
                    # holds the results a moment longer); an error in a cycle stays however long one waits
                    for _ in range(50):
                        alive = [o for o in gc.get_objects() if isinstance(o, ImageLoadError)]
                        if not alive:
                            break
                        del alive  # else the next look finds the error in this list
                        await asyncio.sleep(0.02)
                    else:
                        alive = [o for o in gc.get_objects() if isinstance(o, ImageLoadError)]
                finally:
                    gc.enable()
                return codes, alive

    codes, alive = asyncio.run(go())
    assert codes == [422] * 4, codes
    assert not alive, f"{len(alive)} picture errors still alive after their requests: {alive[:2]}"


def test_serve_refuses_a_gradient_method_of_a_forward_only_model_saying_why():
    from gradmap import contract
    from gradmap.serve._settings import BadRequest, _method_spec

    pre = contract.Preprocessing(crop=(8, 8), resize=None)
    meta = contract.ModelMetadata("m", "w", pre, ("a", "b"), backprops=(), target="portable", cam_layer="auto (x)")
    assert _method_spec("score-cam", {}, "shapes", meta, 100).name == "score-cam"
    with pytest.raises(BadRequest, match=r"does not support grad-cam .*grad-cam reads the gradient and the model was "
                                         r"exported without one \(--no-gradient\); export it with --gradient "
                                         r"--cam-layer auto"):
        _method_spec("grad-cam", {}, "shapes", meta, 100)
