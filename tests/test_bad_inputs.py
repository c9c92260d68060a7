"""Bad input and untrusted models: every row of docs/bad_inputs.md that is not already covered by
test_runtime_*.py / test_cli_run.py is tested here.

Pictures are made in the test (PIL), models are the committed linear fixture or variants of it built
with the onnx package (skipped when onnx is not installed: the runtime itself never imports it).
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from conftest import LINEAR_MODEL, image_info
from gradmap.cli import main
from gradmap.runtime import (
    GradmapModelError,
    ImageLoadError,
    NonFiniteGradientError,
    OutputLayout,
    SaliencyModel,
    atomic_write,
    clip_percentile,
    equalize_histogram,
    iter_saliency,
    load_picture,
    normalize_min_max,
    open_picture,
    reduce_channels,
    render_overlay,
)
from gradmap.runtime.model import ModelOutputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels, followed by a tiny IDAT: what a
    decompression bomb looks like to PIL's size check, in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo(photos, size=(48, 64)) -> Image.Image:
    return Image.fromarray(photos["chelsea"]).resize(size)


# --- Pictures -------------------------------------------------------------------------------------

BAD_PICTURES = {
    "empty.jpg": (lambda p: b"", "empty file"),
    "truncated.jpg": (lambda p: _encoded(p, "JPEG")[:600], "cannot decode image"),
    "truncated.png": (lambda p: _encoded(p, "PNG")[:400], "cannot decode image"),
    "text.png": (lambda p: b"these bytes are not a picture\n" * 10, "not an image"),
    "html.jpg": (lambda p: b"<html><body>404 not found</body></html>", "not an image"),
    "bomb_error.png": (lambda p: _png_header_only(20000, 20000), "decompression bomb"),  # > 2x limit
    "bomb_warning.png": (lambda p: _png_header_only(10000, 10000), "decompression bomb"),  # 1x..2x limit
}


@pytest.mark.parametrize("name", sorted(BAD_PICTURES))
def test_bad_picture_is_a_clear_error_naming_the_file(tmp_path, photos, name):
    make, reason = BAD_PICTURES[name]
    path = tmp_path / name
    path.write_bytes(make(_photo(photos)))
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_picture(path)
    assert info.value.path == str(path), "the error must name the file"
    assert "\n" not in str(info.value), "one line per failure"


def test_decompression_bomb_warning_is_not_decoded(tmp_path, recwarn):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(10000, 10000))  # 100 MP: PIL would only warn, then decode
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_picture(path)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)], \
        "the warning must become the error, not leak"


def test_cli_bad_pictures_one_line_each_the_rest_written_exit_1(runner, tmp_path, photos):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, (make, _) in BAD_PICTURES.items():
        (folder / name).write_bytes(make(_photo(photos)))
    good = [folder / "good1.jpg", folder / "good2.png"]
    for path in good:
        _photo(photos).save(path)
    out = tmp_path / "out"
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(folder), "-o", str(out), "--format", "npy",
                                  "--provider", "cpu", "--threads", "1"])
    assert result.exit_code == 1, result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for name, (_, reason) in BAD_PICTURES.items():
        lines = [line for line in error_lines if line.startswith(f"error: {folder / name}: ")]
        assert len(lines) == 1, f"{name}: expected one error line, got {lines}"
        assert reason in lines[0], f"{name}: {lines[0]!r} does not say {reason!r}"
    total = len(BAD_PICTURES) + len(good)
    assert f"{len(BAD_PICTURES)} of {total} inputs failed" in result.stderr
    for path in good:
        assert np.load(out / f"{path.name}.map.npy").shape == (32, 32)


def _mode_files(tmp_path: Path, photos) -> dict[str, Path]:
    base = _photo(photos)
    files = {
        "L.png": base.convert("L"),
        "LA.png": base.convert("LA"),
        "RGBA.png": base.convert("RGBA"),
        "P.png": base.convert("P"),
        "P-transparent.gif": base.convert("P"),
        "CMYK.jpg": base.convert("CMYK"),
        "CMYK.tif": base.convert("CMYK"),
        "I16.png": Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)),
        "1.bmp": base.convert("1"),
    }
    paths = {}
    for name, image in files.items():
        path = tmp_path / name
        kwargs = {"transparency": 0} if name == "P-transparent.gif" else {}
        image.save(path, **kwargs)
        paths[name] = path
    return paths


def test_every_kind_of_picture_file_is_processed(linear_model, tmp_path, photos):
    paths = _mode_files(tmp_path, photos)
    with Image.open(paths["I16.png"]) as check:
        assert check.mode.startswith("I"), f"the 16-bit fixture decodes as {check.mode}"
    results = list(iter_saliency(linear_model, paths.values(), batch_size=4))
    for name, result in zip(paths, results):
        assert result.ok, f"{name}: {result.error}"
        assert result.picture.mode == "RGB" and result.picture.size == (48, 64), name
        assert np.isfinite(result.maps[0].saliency_map).all(), name


def _frames(kind: str, path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (20, 10), c) for c in colours]
    if kind == "gif":
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    else:
        frames[0].save(path, save_all=True, append_images=frames[1:])


@pytest.mark.parametrize("kind", ["gif", "tiff"])
def test_animated_and_multipage_use_the_first_frame_and_say_so(linear_model, runner, tmp_path, kind):
    path = tmp_path / f"frames.{kind}"
    _frames(kind, path)
    picture, notes = open_picture(path)
    assert picture.size == (20, 10)
    assert np.asarray(picture)[5, 10].tolist() == [255, 0, 0], "the first frame (red) must be used"
    assert len(notes) == 1 and "3 frames: used the first" in notes[0], notes
    (result,) = iter_saliency(linear_model, [path])
    assert result.ok and result.notes == notes
    single = tmp_path / "single.png"
    Image.new("RGB", (4, 4)).save(single)
    assert open_picture(single)[1] == [], "a still picture gets no note"
    cli = runner.invoke(main, ["run", str(LINEAR_MODEL), str(path), "-o", str(tmp_path / "out"), "--format", "npy"])
    assert cli.exit_code == 0, cli.output
    assert "3 frames: used the first" in cli.output, "the CLI must tell the user"


def test_exif_rotated_picture_end_to_end(linear_model, runner, tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=100)
    (result,) = iter_saliency(linear_model, [path])
    assert result.ok and result.geometry.original_size == (20, 10), "height and width must be swapped"
    out = tmp_path / "out"
    cli = runner.invoke(main, ["run", str(LINEAR_MODEL), str(path), "-o", str(out), "--format", "overlay"])
    assert cli.exit_code == 0, cli.output
    assert image_info(out / "rotated.jpg.overlay.png")[0] == (10, 20), "the overlay must be upright"


def test_one_pixel_picture(linear_model, runner, tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(path)
    out = tmp_path / "out"
    cli = runner.invoke(main, ["run", str(LINEAR_MODEL), str(path), "-o", str(out),
                               "--format", "heatmap,overlay,figure,npy"])
    assert cli.exit_code == 0, cli.output
    assert image_info(out / "dot.png.overlay.png")[0] == (1, 1)
    assert image_info(out / "dot.png.heatmap.png")[0] == (1, 1)


def test_10000_by_8000_picture(linear_model, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("RGB", (10000, 8000), (90, 140, 200)).save(path, compress_level=1)  # 80 MP, under PIL's limit
    (result,) = iter_saliency(linear_model, [path])
    assert result.ok, result.error
    assert result.geometry.original_size == (8000, 10000)
    # Rendered at full size, not saved: encoding 80 MP of PNG takes long and is PIL's business.
    values, covered = result.on_original(result.maps[0].equalized_map)
    overlay = render_overlay(result.picture, values, covered)
    assert overlay.size == (10000, 8000)
    assert covered[4000, 5000] and not covered[4000, 0], "the map covers the centre crop only"


def test_pictures_are_read_lazily_batch_by_batch(linear_model, tmp_path, photos):
    path = tmp_path / "p.png"
    _photo(photos).save(path)
    pulled = 0

    def sources():
        nonlocal pulled
        for _ in range(50):
            pulled += 1
            yield path

    seen = 0
    for result in iter_saliency(linear_model, sources(), batch_size=4):
        seen += 1
        assert result.ok
        assert pulled - seen < 4, f"{pulled} pictures pulled for {seen} results: not streaming"
    assert seen == 50


# --- Outputs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_atomic_write_leaves_nothing_on_failure(tmp_path, failure):
    target = tmp_path / "sub" / "x.jpg.heatmap.png"

    def write(f):
        f.write(b"\x89PNG half of a picture")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(target, write)
    assert not target.exists(), "a half-written output was left"
    assert list(target.parent.iterdir()) == [], "the temporary file was left"
    target.write_bytes(b"old complete output")
    with pytest.raises(type(failure)):
        atomic_write(target, write)
    assert target.read_bytes() == b"old complete output", "a failed write must not touch the existing file"


def test_atomic_write_cleans_up_when_interrupted_as_the_file_is_created(tmp_path, monkeypatch):
    """A signal can land right after the temporary file is created, before the call creating it has
    returned its name (a SIGTERM did, once, with tempfile.mkstemp): nothing may be left."""
    import os

    real_open = os.open

    def open_then_interrupted(*args, **kwargs):
        real_open(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "open", open_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.png", lambda f: f.write(b"data"))
    assert list(tmp_path.iterdir()) == [], "the temporary file was left"


def test_atomic_write_gives_outputs_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "x.png", lambda f: f.write(b"data"))
    finally:
        os.umask(umask)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o644, "outputs are readable like any file the user writes"


def test_inputs_named_like_outputs_are_never_overwritten(runner, tmp_path, photos):
    _photo(photos).save(tmp_path / "x.jpg")
    decoy = tmp_path / "x.jpg.heatmap.png"
    _photo(photos).save(decoy)
    before = decoy.read_bytes()
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(tmp_path / "x.jpg"), str(decoy), "-o", str(tmp_path),
                                  "--format", "heatmap"])
    assert result.exit_code == 1, result.output
    assert "refusing to overwrite input" in result.stderr
    assert decoy.read_bytes() == before


def _many_pictures(folder: Path, photos, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    base = np.asarray(_photo(photos, (160, 120)))
    paths = []
    for i in range(count):
        path = folder / f"p{i:03d}.png"
        Image.fromarray(np.roll(base, i, axis=1)).save(path, compress_level=1)
        paths.append(path)
    return paths


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


def _check_complete(paths: list[Path]) -> None:
    for path in paths:
        if path.suffix == ".npy":
            np.load(path)
        else:
            with Image.open(path) as image:
                image.load()  # raises on a truncated PNG


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_run_leaves_no_partial_output_and_skip_existing_resumes(tmp_path, photos, sig):
    # 100 pictures: with 40, a test process starved by a loaded machine saw the whole run written
    # (200 files) before it could send the signal.
    pictures = _many_pictures(tmp_path / "in", photos, 100)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gradmap.cli", "run", str(LINEAR_MODEL), str(tmp_path / "in"), "-o", str(out),
               "--format", "heatmap,overlay,figure,npy", "--batch-size", "2", "--provider", "cpu", "--threads", "1"]
    # SIGINT at its default in the run: a shell that starts a job in the background without job
    # control (as CI scripts under nohup do) ignores SIGINT for it, the ignore is inherited, and
    # Python then installs no KeyboardInterrupt handler, so the run would never see the signal.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
                               preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while len(list(out.rglob("*.png"))) < 12 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be interrupted; use more pictures"
    process.send_signal(sig)
    process.wait(timeout=60)
    process.stderr.close()
    finals = [p for p in _outputs(out) if not p.name.endswith(".tmp")]
    temporaries = [p for p in _outputs(out) if p.name.endswith(".tmp")]
    _check_complete(finals)
    assert 0 < len(finals) < 100 * 5, "interrupted neither too early nor too late"
    if sig != signal.SIGKILL:
        # Exiting with a code (not killed by the signal) shows Python unwound through atomic_write's
        # cleanup even when no write happened to be in flight at that instant.
        assert process.returncode > 0, f"{sig.name} killed the run (code {process.returncode}) instead of unwinding"
        assert temporaries == [], f"temporary files left after {sig.name}: {temporaries}"
    assert all(p.name.startswith(".") for p in temporaries), "a leftover temporary file must be hidden"

    layout = OutputLayout(out, [str(p) for p in pictures])
    formats = ["heatmap", "overlay", "figure", "npy"]
    done_before = sum(layout.complete(str(p), formats) for p in pictures)
    stamps = {p: p.stat().st_mtime_ns for p in finals}
    resumed = subprocess.run(command + ["--skip-existing"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {done_before} " in resumed.stderr + resumed.stdout, "the summary must count skipped pictures"
    assert all(layout.complete(str(p), formats) for p in pictures), "--skip-existing did not finish the run"
    _check_complete([p for p in _outputs(out) if not p.name.endswith(".tmp")])
    for picture in pictures:
        if all(path in stamps for path in layout.planned(str(picture), formats)):
            for path in layout.planned(str(picture), formats):
                assert path.stat().st_mtime_ns == stamps[path], f"{path} was rewritten although complete"


def test_skip_existing_needs_every_requested_output(runner, tmp_path, photos):
    pictures = _many_pictures(tmp_path / "in", photos, 3)
    out = tmp_path / "out"
    args = ["run", str(LINEAR_MODEL), str(tmp_path / "in"), "-o", str(out), "--provider", "cpu"]
    first = runner.invoke(main, args + ["--format", "npy"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(main, args + ["--format", "npy", "--skip-existing"])
    assert again.exit_code == 0 and "skipped 3 " in again.output, again.output
    (out / f"{pictures[1].name}.map.npy").unlink()
    more = runner.invoke(main, args + ["--format", "npy,heatmap", "--skip-existing"])
    assert more.exit_code == 0 and "skipped 0 " in more.output, "heatmaps were missing: nothing is complete"
    top2 = runner.invoke(main, args + ["--format", "npy,heatmap", "--target", "top2", "--skip-existing"])
    assert top2.exit_code == 0 and "skipped 0 " in top2.output, "top2 writes other files than top1"
    assert (out / f"{pictures[0].name}.top2.heatmap.png").is_file()


# --- Models ---------------------------------------------------------------------------------------

def _fixture_proto():
    onnx = pytest.importorskip("onnx")
    return onnx, onnx.load(str(LINEAR_MODEL))


@pytest.fixture()
def no_session(monkeypatch):
    """Fail the test if onnxruntime is asked to open the model at all."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("onnxruntime saw a model that should have been refused before")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def _with_external(tmp_path: Path, location: str, *, tensor: str = "W", write_data: Path | None = None) -> Path:
    """The fixture with tensor ``tensor`` moved to external data at ``location`` (written by hand, so
    that any location can be tried, hostile ones included)."""
    onnx, proto = _fixture_proto()
    from onnx import numpy_helper

    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    init = next(t for t in proto.graph.initializer if t.name == tensor)
    data = numpy_helper.to_array(init).tobytes()
    if write_data is not None:
        write_data.parent.mkdir(parents=True, exist_ok=True)
        write_data.write_bytes(data)
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    del init.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    path = model_dir / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_external_data_inside_the_folder_loads(tmp_path, linear_weights):
    onnx, proto = _fixture_proto()
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.data", size_threshold=1024)  # W only: onnxruntime wants shapes inline
    assert (folder / "model.data").is_file()
    model = SaliencyModel(path, provider="cpu", threads=1)
    out = model.run(np.zeros((1, 3, 32, 32), np.float32), [2])
    assert np.array_equal(out.gradient.reshape(-1), linear_weights[0][2]), "weights must come from the side file"
    hand = _with_external(tmp_path, "weights/w.bin", write_data=folder / "weights" / "w.bin")
    assert SaliencyModel(hand, provider="cpu").run(np.zeros((1, 3, 32, 32), np.float32), [1]).gradient.any()


def test_external_data_listing_matches_onnx(tmp_path):
    onnx, proto = _fixture_proto()
    from onnx import external_data_helper

    from gradmap.runtime._onnx_header import read_external_data

    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    expected = {t.name: dict((e.key, e.value) for e in t.external_data)["location"]
                for t in external_data_helper._get_all_tensors(onnx.load(str(path), load_external_data=False))
                if external_data_helper.uses_external_data(t)}
    assert len(expected) == 4
    assert {t.name: t.location for t in read_external_data(str(path))} == expected


@pytest.mark.parametrize("location,reason", [
    ("/etc/passwd", "absolute path"),
    ("C:\\Windows\\win.ini", "absolute path"),
    ("../secret.bin", "contains '..'"),
    ("weights/../../secret.bin", "contains '..'"),
    ("", "empty"),
    ("missing.bin", "missing from the model's folder"),
], ids=["absolute", "windows-absolute", "dotdot", "nested-dotdot", "empty", "missing"])
def test_external_data_outside_the_folder_is_refused_before_onnxruntime(tmp_path, no_session, location, reason):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16384)
    path = _with_external(tmp_path, location)
    with pytest.raises(GradmapModelError, match=reason) as info:
        SaliencyModel(path, provider="cpu")
    assert info.value.path == str(path) and "'W'" in str(info.value), "name the model and the tensor"


def test_external_data_symlink_out_of_the_folder_is_refused(tmp_path, no_session):
    secret = tmp_path / "elsewhere" / "secret.bin"
    path = _with_external(tmp_path, "w.bin", write_data=secret)
    (path.parent / "w.bin").symlink_to(secret)
    with pytest.raises(GradmapModelError, match="outside the model's folder"):
        SaliencyModel(path, provider="cpu")
    (path.parent / "w.bin").unlink()
    (path.parent / "sub").symlink_to(secret.parent, target_is_directory=True)
    path = _with_external(tmp_path, "sub/secret.bin")
    with pytest.raises(GradmapModelError, match="outside the model's folder"):
        SaliencyModel(path, provider="cpu")


@pytest.mark.parametrize("where", ["constant", "subgraph"])
def test_external_data_in_a_constant_node_is_checked_too(tmp_path, no_session, where):
    onnx, proto = _fixture_proto()
    from onnx import TensorProto, helper, numpy_helper

    zero = next(t for t in proto.graph.initializer if t.name == "zero")
    proto.graph.initializer.remove(zero)
    value = numpy_helper.from_array(np.array(0, np.int64), "zero_value")
    value.ClearField("raw_data")
    value.ClearField("int64_data")
    value.data_location = onnx.TensorProto.EXTERNAL
    entry = value.external_data.add()
    entry.key, entry.value = "location", "/dev/zero"
    constant = helper.make_node("Constant", [], ["zero"], value=value)
    if where == "subgraph":  # the Constant inside an If branch: subgraphs are walked too
        out = helper.make_tensor_value_info("zero", TensorProto.INT64, [])
        branch = helper.make_graph([constant], "branch", [], [out])
        proto.graph.initializer.append(numpy_helper.from_array(np.array(True), "always"))
        constant = helper.make_node("If", ["always"], ["zero"], then_branch=branch, else_branch=branch)
    proto.graph.node.insert(0, constant)
    path = tmp_path / "constant.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(GradmapModelError, match="'zero_value'.*absolute path"):
        SaliencyModel(path, provider="cpu")


def test_opset_and_ir_newer_than_onnxruntime(tmp_path):
    onnx, proto = _fixture_proto()
    proto.opset_import[0].version = 30
    path = tmp_path / "future.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(GradmapModelError, match=r"opset 30 of domain ai\.onnx is newer than this onnxruntime "
                                                r"\(\S+\) supports \(up to opset \d+\)") as info:
        SaliencyModel(path, provider="cpu")
    assert info.value.path == str(path)
    proto.opset_import[0].version = 18
    proto.ir_version = 99
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(GradmapModelError, match=r"IR version 99 is newer than this onnxruntime .* \(up to IR version \d+\)"):
        SaliencyModel(path, provider="cpu")


def test_runtime_never_imports_onnx(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(LINEAR_MODEL.read_bytes())
    script = textwrap.dedent(f"""
        import sys
        from gradmap.runtime import SaliencyModel
        SaliencyModel({str(model)!r}, provider="cpu")
        print("ONNX", "onnx" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "ONNX False" in done.stdout, done.stdout + done.stderr


# --- Numbers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_gradient_is_reported_not_rendered(runner, tmp_path, photos, monkeypatch, bad):
    original = SaliencyModel.run

    def poisoned(self, images, targets=None):
        out = original(self, images, targets)
        gradient = out.gradient.copy()
        gradient[0, 1, 2, 3] = bad
        return ModelOutputs(out.logits, out.target_index, gradient)

    monkeypatch.setattr(SaliencyModel, "run", poisoned)
    path = tmp_path / "p.png"
    _photo(photos).save(path)
    out = tmp_path / "out"
    result = runner.invoke(main, ["run", str(LINEAR_MODEL), str(path), "-o", str(out), "--batch-size", "1"])
    assert result.exit_code == 1, result.output
    word = "NaN" if np.isnan(bad) else "infinite"
    assert f"error: {path}: gradient for class" in result.stderr and word in result.stderr, result.stderr
    assert not out.exists() or _outputs(out) == [], "a black picture was written for a broken gradient"


def test_zero_gradient_gives_zero_maps(linear_model, photos, monkeypatch, tmp_path):
    original = SaliencyModel.run

    def flat(self, images, targets=None):
        out = original(self, images, targets)
        return ModelOutputs(out.logits, out.target_index, np.zeros_like(out.gradient))

    monkeypatch.setattr(SaliencyModel, "run", flat)
    (result,) = iter_saliency(linear_model, [_photo(photos)])
    assert result.ok
    m = result.maps[0]
    assert not m.saliency_map.any() and not m.equalized_map.any(), "a flat map must be zeros, not NaN or 0.5"
    assert np.isfinite(m.saliency_map).all()


# --- Concurrency ----------------------------------------------------------------------------------

def test_one_model_from_8_threads_equals_sequential(photos):
    model = SaliencyModel(LINEAR_MODEL, provider="cpu", threads=1)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(int(rng.integers(1, 4)), 3, 32, 32)).astype(np.float32) for _ in range(25)]
    targets = [rng.integers(-1, 4, size=x.shape[0]) for x in inputs]
    calls = [i % len(inputs) for i in range(1000)]
    sequential = [model.run(inputs[i], targets[i]) for i in calls]
    barrier = threading.Barrier(8)

    def call(i: int) -> ModelOutputs:
        if i < 8:
            barrier.wait()  # start all threads together
        return model.run(inputs[calls[i]], targets[calls[i]])

    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(call, range(1000)))
    for i, (a, b) in enumerate(zip(sequential, threaded)):
        for name in ("logits", "target_index", "gradient"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), f"call {i}: {name} differs from sequential"


# --- Postprocessing properties --------------------------------------------------------------------

_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64, np.bool_]


@st.composite
def _maps(draw, dims: int):
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=dims, max_dims=dims, min_side=1, max_side=16))
    if dtype.kind == "f":
        elements = st.floats(allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8)
    else:
        elements = None  # hypothesis' full range of the integer or bool dtype
    if draw(st.booleans()):
        value = draw(hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False))
        return np.full(shape, value, dtype=dtype)  # constant maps, the classic divide by zero
    return draw(hnp.arrays(dtype, shape, elements=elements))


def _in_unit_interval(out: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    assert out.shape == shape, f"{what} changed the shape {shape} -> {out.shape}"
    assert np.isfinite(out).all(), f"{what} produced non-finite values"
    assert out.size == 0 or (out.min() >= 0.0 and out.max() <= 1.0), f"{what} left [0, 1]"


@settings(max_examples=200, deadline=None)
@given(_maps(2))
def test_map_functions_any_dtype_and_range(m):
    for fn in (normalize_min_max, equalize_histogram):
        out = fn(m)
        _in_unit_interval(out, m.shape, fn.__name__)
        if np.all(m == m.flat[0]):
            assert not out.any(), f"{fn.__name__} of a constant map must be zeros"
    clipped = clip_percentile(m, 1.0, 99.0)
    assert clipped.shape == m.shape and np.isfinite(clipped.astype(np.float64)).all()
    for fn in (normalize_min_max, equalize_histogram):
        _in_unit_interval(fn(clipped), m.shape, f"{fn.__name__} after clip_percentile")


@settings(max_examples=150, deadline=None)
@given(_maps(3), st.sampled_from(["max", "sum", "l2"]))
def test_gradient_pipeline_any_dtype_and_range(g, method):
    reduced = reduce_channels(g, method)
    for fn in (normalize_min_max, equalize_histogram):
        _in_unit_interval(fn(reduced), g.shape[1:], f"{fn.__name__}(reduce_channels({method}))")
