"""`gradmap run --engine ray` and gradmap.distributed on a local Ray of 2 CPUs, against single-process
`gradmap run` on the same ~20 pictures (broken ones included): the same files byte for byte, the
same records, the same maps in Parquet, and a run that survives a killed actor.

Needs the [ray] extra; skipped without it, except in CI (CI=true), where a missing Ray fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gradmap.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "demo" / "shapes.onnx"
BROKEN = {"empty.png": "empty file", "cut.png": "cannot decode image", "text.jpg": "not an image"}
N_GOOD = 17


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Ray Data is not installed ({e}); CI must run these tests: pip install '.[ray,test]'")
        pytest.skip(f"Ray Data is not installed ({e}): pip install 'gradmap[ray]'")
    return ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 2 CPUs and a small object store, shut down after this module's tests."""
    ray = _import_ray()
    assert not ray.is_initialized(), "another test left Ray running"
    # On loopback, without token authentication: a Ray Client connection to Ray 2.60 with tokens on
    # timed out ("no authorization header"); nothing outside this machine can reach the cluster.
    auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()
        if auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth
        assert not ray.is_initialized(), "Ray was not shut down"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """17 pictures (the demo's 10, 7 variants in a subfolder of other sizes) and 3 broken files."""
    folder = tmp_path_factory.mktemp("ray") / "in"
    (folder / "sub").mkdir(parents=True)
    demo = sorted((REPO / "models" / "demo" / "images").glob("*.png"))
    for path in demo:
        (folder / path.name).write_bytes(path.read_bytes())
    for i, path in enumerate(demo[:N_GOOD - len(demo)]):
        with Image.open(path) as image:
            variant = Image.fromarray(np.roll(np.asarray(image.convert("RGB")), 5 * i, axis=1))
        variant.resize((80 + 7 * i, 70 + 3 * i)).save(folder / "sub" / f"v{i}.jpg", quality=90)
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.png").write_bytes(demo[0].read_bytes()[:120])
    (folder / "text.jpg").write_bytes(b"not a picture\n" * 20)
    return folder


def _run(*args: str) -> "tuple[int, str, str]":
    result = CliRunner().invoke(main, ["run", str(DEMO_MODEL), *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _errors(stderr: str) -> list[str]:
    return sorted(line for line in stderr.splitlines() if line.startswith("error: "))


def _records(doc: dict, out: Path) -> list[dict]:
    """The records with output paths relative to ``out``, to compare runs into different folders."""
    records = json.loads(json.dumps(doc["images"]))
    for record in records:
        for m in record["maps"]:
            m["files"] = {k: Path(v).relative_to(out).as_posix() for k, v in m["files"].items()}
    return records


COMMON = ("--format", "npy,heatmap", "--batch-size", "4", "--threads", "1", "--provider", "cpu", "--json")


@pytest.fixture(scope="module")
def reference(pictures, tmp_path_factory):
    """Single-process `gradmap run` on the same pictures: (output folder, JSON document, stderr)."""
    out = tmp_path_factory.mktemp("ray") / "single"
    code, stdout, stderr = _run(str(pictures), "--out", str(out), *COMMON)
    assert code == 1, stderr
    doc = json.loads(stdout)
    assert doc["failed"] == len(BROKEN) and len(doc["images"]) == N_GOOD + len(BROKEN)
    return out, doc, stderr


def test_ray_engine_writes_the_same_files_and_records(ray_cluster, pictures, reference, tmp_path):
    ref_out, ref_doc, ref_stderr = reference
    out = tmp_path / "ray"
    code, stdout, stderr = _run(str(pictures), "--out", str(out), *COMMON, "--engine", "ray", "--workers", "2")
    assert code == 1, stderr
    assert _errors(stderr) == _errors(ref_stderr), "the broken files must fail with the same reasons"
    for name, reason in BROKEN.items():
        assert any(line.startswith(f"error: {pictures / name}: {reason}") for line in _errors(stderr)), name
    assert f"{len(BROKEN)} of {N_GOOD + len(BROKEN)} inputs failed" in stderr
    doc = json.loads(stdout)
    assert _records(doc, out) == _records(ref_doc, ref_out), "records differ from single-process gradmap run"
    ours, theirs = _files(out), _files(ref_out)
    assert sorted(ours) == sorted(theirs), "not the same output files"
    assert len([n for n in ours if n.endswith(".map.npy")]) == N_GOOD
    assert "sub/v0.jpg.gradient.npy" in ours, "the input tree must be mirrored"
    different = [name for name in ours if ours[name] != theirs[name]]
    assert not different, f"not byte-identical to single-process gradmap run: {different}"


KERAS_FIXTURES = REPO / "tests" / "fixtures" / "keras"


@pytest.mark.parametrize("name,method", [("cnn.gradmap.onnx", "guided-grad-cam"), ("cnn.gradmap.onnx", "smoothgrad"),
                                         ("cnn_cpu.gradmap.onnx", "grad-cam"), ("cnn_plain.gradmap.onnx", "vanilla")],
                         ids=["portable-guided-grad-cam", "portable-smoothgrad", "cpu-grad-cam", "plain-vanilla"])
def test_ray_engine_on_a_keras_export_equals_local(ray_cluster, pictures, tmp_path, name, method):
    """A ``gradmap export keras:PATH`` file (tests/fixtures/keras: tf2onnx's NHWC graph, BGR 0-255 caffe
    preprocessing, an NHWC Grad-CAM map, guided ReLUs), portable and --target cpu: the Ray engine writes
    the bytes and records single-process gradmap run writes."""
    model = str(KERAS_FIXTURES / name)
    args = (str(pictures), *COMMON, "--method", method, "--samples", "3", "--seed", "4")
    runs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        result = CliRunner().invoke(main, ["run", model, "--out", str(out), *args, "--engine", engine,
                                           *(["--workers", "2"] if engine == "ray" else [])])
        assert result.exit_code == 1, f"{engine}: {result.stderr[-3000:]}"  # the broken files
        runs[engine] = (out, json.loads(result.stdout), _errors(result.stderr))
    (local_out, local_doc, local_errors), (ray_out, ray_doc, ray_errors) = runs["local"], runs["ray"]
    assert ray_errors == local_errors and local_doc["failed"] == len(BROKEN)
    assert _records(ray_doc, ray_out) == _records(local_doc, local_out), "records differ from local gradmap run"
    assert all(record["maps"][0]["method"] == method for record in local_doc["images"] if record["error"] is None)
    ours, theirs = _files(ray_out), _files(local_out)
    assert sorted(ours) == sorted(theirs) and len([n for n in ours if n.endswith(".map.npy")]) == N_GOOD
    different = [n for n in ours if ours[n] != theirs[n]]
    assert not different, f"not byte-identical to local gradmap run: {different}"
    if method == "grad-cam":  # the maps in Parquet: the model's 48x64, not square
        parquet = tmp_path / "maps.parquet"
        result = CliRunner().invoke(main, ["run", model, str(pictures), *COMMON[2:], "--method", method, "--engine",
                                           "ray", "--to-parquet", str(parquet)])
        assert result.exit_code == 1, result.stderr[-3000:]
        rows = {row["path"]: row for row in ray_cluster.data.read_parquet(str(parquet)).iter_rows()}
        for record in local_doc["images"]:
            if record["error"] is None:
                saved = np.load(local_out / Path(record["maps"][0]["files"]["map"]).relative_to(local_out))
                got = np.asarray(rows[record["path"]]["saliency_map"])
                assert got.shape == (1, 48, 64) and np.array_equal(got[0], saved), record["path"]


def test_to_parquet_holds_the_same_maps(ray_cluster, pictures, reference, tmp_path):
    ref_out, ref_doc, _ = reference
    parquet = tmp_path / "maps.parquet"
    out = tmp_path / "unused"
    code, stdout, stderr = _run(str(pictures), "--out", str(out), "--batch-size", "4", "--threads", "1", "--json",
                                "--engine", "ray", "--to-parquet", str(parquet))
    assert code == 1, stderr
    assert not out.exists(), "--to-parquet writes no picture files"
    assert json.loads(stdout)["failed"] == len(BROKEN)
    rows = {row["path"]: row for row in ray_cluster.data.read_parquet(str(parquet)).iter_rows()}
    expected = {record["path"]: record for record in ref_doc["images"]}
    assert sorted(rows) == sorted(expected), "one row per input picture"
    for path, record in expected.items():
        row = rows[path]
        assert row["error"] == record["error"], path
        saliency_map = np.asarray(row["saliency_map"])
        assert saliency_map.shape == (1, 64, 64) and saliency_map.dtype == np.float32, (path, saliency_map.shape)
        if record["error"] is not None:
            assert np.isnan(saliency_map).all(), f"{path}: a failed row's map must be NaN"
            continue
        saved = np.load(ref_out / Path(record["maps"][0]["files"]["map"]).relative_to(ref_out))
        assert np.array_equal(saliency_map[0], saved), f"{path}: map differs from gradmap run's .map.npy"
        assert list(row["target_index"]) == [record["maps"][0]["target"]["index"]], path
        assert list(row["top_label"]) == [p["label"] for p in record["predictions"]], path
        assert json.loads(row["record"])["predictions"] == record["predictions"], path


def test_explain_dataset_on_bytes_read_by_ray(ray_cluster, pictures, reference):
    from gradmap.distributed import explain_dataset

    ref_out, ref_doc, _ = reference
    dataset = ray_cluster.data.read_binary_files(str(pictures), include_paths=True)
    rows = {Path(row["path"]).relative_to(pictures).as_posix(): row
            for row in explain_dataset(dataset, DEMO_MODEL, batch_size=4, workers=1).iter_rows()}
    assert len(rows) == N_GOOD + len(BROKEN)
    for record in ref_doc["images"]:
        row = rows[Path(record["path"]).relative_to(pictures).as_posix()]
        assert row["error"] == record["error"], record["path"]
        if record["error"] is None:
            saved = np.load(ref_out / Path(record["maps"][0]["files"]["map"]).relative_to(ref_out))
            assert np.array_equal(np.asarray(row["saliency_map"])[0], saved), record["path"]


def _actor_pids() -> list[int]:
    """Processes of gradmap's Ray Data actors (Ray titles them after the actor class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ray::" in title and b"_Explainer" in title:
                pids.append(int(entry.name))
    return pids


def test_killed_actor_costs_its_batch_and_skip_existing_completes(ray_cluster, pictures, tmp_path):
    slow = ("--method", "smoothgrad", "--samples", "50", "--format", "npy", "--batch-size", "2", "--threads", "1")
    ref_out = tmp_path / "single"
    code, _, stderr = _run(str(pictures), "--out", str(ref_out), *slow)
    assert code == 1, stderr
    out = tmp_path / "ray"
    outcome: dict = {}

    def run() -> None:
        outcome["result"] = _run(str(pictures), "--out", str(out), *slow, "--engine", "ray", "--workers", "2")

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 180
    while not list(out.rglob("*.map.npy")) and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    pids = _actor_pids()
    done_at_kill = len(list(out.rglob("*.map.npy")))
    assert pids and thread.is_alive(), "the run ended before an actor could be killed"
    os.kill(pids[0], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not finish after an actor was killed"
    assert done_at_kill < N_GOOD, "the actor was killed after all maps were written: use more work"
    code, _, stderr = outcome["result"]
    assert code == 1, stderr
    assert f"{len(BROKEN)} of {N_GOOD + len(BROKEN)} inputs failed" in stderr
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert all(p.name.startswith(".") for p in leftovers), f"a temporary file under a visible name: {leftovers}"
    finals = {k: v for k, v in _files(out).items() if not k.endswith(".tmp")}
    assert finals == _files(ref_out), "after the retry, the outputs must equal the single-process run's"

    victim = next(iter(sorted(out.rglob("*.map.npy"))))
    victim.unlink()
    code, _, stderr = _run(str(pictures), "--out", str(out), *slow, "--engine", "ray", "--skip-existing")
    assert code == 1, stderr
    assert f"skipped {N_GOOD - 1} of {N_GOOD + len(BROKEN)} inputs" in stderr
    finals = {k: v for k, v in _files(out).items() if not k.endswith(".tmp")}
    assert finals == _files(ref_out), "--skip-existing must complete the set with the same bytes"


@pytest.mark.parametrize("args,message", [
    (["--to-parquet", "{tmp}/p"], "need --engine ray"),
    (["--workers", "2"], "need --engine ray"),
    (["--engine", "ray", "--to-parquet", "{tmp}/p", "--format", "npy"], "instead of --format"),
    (["--engine", "ray", "--to-parquet", "{tmp}/p", "--skip-existing"], "not a Parquet dataset"),
    (["--engine", "ray", "--to-parquet", "{tmp}/full"], "not empty"),
], ids=["parquet-local", "workers-local", "parquet-format", "parquet-skip", "parquet-not-empty"])
def test_ray_usage_errors_exit_2(pictures, tmp_path, args, message):
    _import_ray()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.parquet").write_bytes(b"")
    code, _, stderr = _run(str(pictures), "--out", str(tmp_path / "o"), *[a.format(tmp=tmp_path) for a in args])
    assert code == 2, stderr
    assert message in stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_without_ray_says_how_to_install(pictures, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, _, stderr = _run(str(pictures), "--out", str(tmp_path / "o"), "--engine", "ray")
    assert code == 1 and "pip install 'gradmap[ray]'" in stderr, stderr
    from gradmap.distributed import explain_dataset

    with pytest.raises(ImportError, match=r"pip install 'gradmap\[ray\]'"):
        explain_dataset(["x.png"], DEMO_MODEL)


def test_gradmap_never_imports_ray_unless_asked():
    script = textwrap.dedent("""
        import sys
        import gradmap.cli, gradmap.distributed, gradmap.runtime
        from click.testing import CliRunner
        assert CliRunner().invoke(gradmap.cli.main, ["run", "--help"]).exit_code == 0
        print("RAY", sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "pyarrow", "pandas")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "RAY []" in done.stdout, done.stdout + done.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float = 120.0) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the Ray Client server exited with {process.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the Ray Client server did not listen on port {port} within {seconds:.0f} s")


def test_existing_cluster_by_address_and_through_the_ray_client(ray_cluster, pictures, reference, tmp_path):
    """gradmap run in another process joins this module's Ray (loopback only) by its address and
    through a Ray Client server: the same files as single-process gradmap run."""
    ref_out, _, _ = reference
    gcs = "127.0.0.1:" + ray_cluster.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    port = _free_port()
    # A Ray Client server in its single-process ("legacy") mode. In "proxy" mode (what `ray start
    # --head` runs) Ray 2.60 forks one server per client from a gRPC process, and that child
    # intermittently dies in fork (ray-project/ray#63202): 2 CI runs here failed with "Initialization
    # failure from server ... psutil.ZombieProcess" and empty server logs. gradmap's side of a ray://
    # address is the same in both modes.
    server = subprocess.Popen([sys.executable, "-m", "ray.util.client.server", "--host", "127.0.0.1", "--port",
                               str(port), "--mode", "legacy", "--address", gcs], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for name, address in (("address", gcs), ("client", f"ray://127.0.0.1:{port}")):
            if name == "client":
                _wait_for_port(port, server)  # the server starts in the background; on a busy machine it
                # took longer than the Ray Client's connection retries
            out = tmp_path / name
            done = subprocess.run([sys.executable, "-m", "gradmap.cli", "run", str(DEMO_MODEL), str(pictures),
                                   "--out", str(out), *COMMON, "--engine", "ray", "--address", address],
                                  capture_output=True, text=True, timeout=300, cwd=REPO)
            assert done.returncode == 1, f"{name}: {done.stderr[-3000:]}"
            assert done.stdout.strip(), f"{name}: no summary on stdout; stderr: {done.stderr[-3000:]}"
            assert json.loads(done.stdout)["failed"] == len(BROKEN), name
            assert _files(out) == _files(ref_out), f"{name}: files differ from single-process gradmap run"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and anything it started
        server.wait(timeout=60)


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            queue.append(child)
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_a_dead_ray_node_ends_the_run_with_one_gradmap_error(pictures, tmp_path):
    """The local Ray of a `gradmap run --engine ray` loses its raylet mid-run: one gradmap error (how
    many pictures are written, --skip-existing finishes the set), no Ray traceback; --skip-existing
    then completes the set with the bytes of a single-process run."""
    _import_ray()
    slow = ("--method", "smoothgrad", "--samples", "50", "--format", "npy", "--batch-size", "2", "--threads", "1")
    out = tmp_path / "ray"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.Popen([sys.executable, "-m", "gradmap.cli", "run", str(DEMO_MODEL), str(pictures), "--out",
                            str(out), *slow, "--engine", "ray", "--workers", "2"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.rglob("*.map.npy")) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        raylets = [pid for pid in _descendants(run.pid) if _comm(pid) == "raylet"]
        assert raylets and run.poll() is None, "the run ended (or never started Ray) before its node could be killed"
        os.kill(raylets[0], signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    written = len(list(out.rglob("*.map.npy")))
    assert run.returncode == 1, stderr[-3000:]
    assert written < N_GOOD, "every picture was written before the node died: use more work"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "the Ray node failed during the run" in errors[0], stderr[-3000:]
    assert f"{written} of {N_GOOD + len(BROKEN)} pictures have all their outputs written" in errors[0], errors[0]
    assert "--skip-existing to finish the set" in errors[0]

    ref_out = tmp_path / "single"
    _run(str(pictures), "--out", str(ref_out), *slow)
    code, _, stderr = _run(str(pictures), "--out", str(out), *slow, "--skip-existing")
    assert code == 1 and f"skipped {written} of" in stderr, stderr
    finals = {k: v for k, v in _files(out).items() if not k.endswith(".tmp")}
    assert finals == _files(ref_out), "--skip-existing must complete the set with the same bytes"


def test_a_lost_ray_client_connection_ends_the_run_with_one_gradmap_error(ray_cluster, pictures, tmp_path):
    """gradmap run through a Ray Client server that is killed mid-run: one gradmap error naming the
    ray:// address, the pictures written and --skip-existing; no traceback."""
    gcs = "127.0.0.1:" + ray_cluster.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "ray.util.client.server", "--host", "127.0.0.1", "--port",
                               str(port), "--mode", "legacy", "--address", gcs], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    slow = ("--method", "smoothgrad", "--samples", "50", "--format", "npy", "--batch-size", "2", "--threads", "1")
    out = tmp_path / "client"
    env = {**os.environ, "RAY_CLIENT_RECONNECT_GRACE_PERIOD": "3"}
    try:
        _wait_for_port(port, server)
        run = subprocess.Popen([sys.executable, "-m", "gradmap.cli", "run", str(DEMO_MODEL), str(pictures), "--out",
                                str(out), *slow, "--engine", "ray", "--address", f"ray://127.0.0.1:{port}"], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while not list(out.rglob("*.map.npy")) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before its connection could be cut"
        os.killpg(server.pid, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)
    assert run.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert f"the connection to Ray at ray://127.0.0.1:{port} failed during the run" in errors[0], errors[0]
    assert re.search(rf"\d+ of {N_GOOD + len(BROKEN)} pictures have all their outputs written", errors[0]), errors[0]
    assert "--skip-existing to finish the set" in errors[0]
