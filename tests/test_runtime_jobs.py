"""The per-picture job shared by `gradmap run` and the Ray workers (gradmap.runtime.jobs)."""

from __future__ import annotations

import gc
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import LINEAR_MODEL
from gradmap.cli import main
from gradmap.runtime import (EncodedPicture, ImageLoadError, JobSettings, NonFiniteGradientError, OutputLayout,
                             SaliencyModel, compute_saliency, explain_and_write, iter_saliency, open_picture,
                             parse_target)
from gradmap.runtime.model import ModelOutputs
from gradmap.runtime.render import RenderOptions


def _outputs(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bytes_decode_like_the_file(photo_files, tmp_path):
    for path in photo_files:
        from_file, notes = open_picture(path)
        from_bytes, notes_b = open_picture(str(path), path.read_bytes())
        assert from_file.tobytes() == from_bytes.tobytes() and notes == notes_b, path.name
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file") as info:
        open_picture(str(empty), b"")
    assert info.value.path == str(empty), "the error names the picture the bytes came from"


def test_job_writes_what_gradmap_run_writes_from_paths_and_bytes(linear_model, photo_files, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo_files[0].read_bytes()[:200])
    inputs = [*map(str, photo_files), str(broken)]
    cli_out = tmp_path / "cli"
    cli = CliRunner().invoke(main, ["run", str(LINEAR_MODEL), *inputs, "--out", str(cli_out), "--json",
                                    "--target", "top2", "--format", "npy,heatmap,figure", "--provider", "cpu",
                                    "--threads", "1"])
    assert cli.exit_code == 1, cli.output
    cli_records = json.loads(cli.stdout)["images"]
    settings = JobSettings(target=parse_target("top2", linear_model.labels), formats=("npy", "heatmap", "figure"),
                           render=RenderOptions())
    for kind, sources in (("paths", inputs), ("bytes", [EncodedPicture(p, open(p, "rb").read()) for p in inputs])):
        out = tmp_path / kind
        done = list(explain_and_write(linear_model, sources, OutputLayout(out, inputs), settings))
        records = [d.record for d in done]
        for record in records:
            for m in record["maps"]:
                m["files"] = {k: v.replace(str(out), str(cli_out)) for k, v in m["files"].items()}
        assert records == cli_records, f"{kind}: records differ from gradmap run --json"
        assert _outputs(out) == _outputs(cli_out), f"{kind}: files differ from gradmap run's"
        assert [d.ok for d in done] == [True, True, False]
        assert done[2].record["error"].startswith("cannot decode image"), done[2].record
        assert done[0].result.maps[1].saliency_map.shape == (32, 32), "the maps stay available in memory"


def test_overlapped_writes_give_the_sequential_files_and_records(linear_model, photos, tmp_path):
    """explain_and_write writes a batch's files on a second thread while the next batch runs: the same
    files, byte for byte, and the same records in the same order as writing in turn; a caller that
    stops early finds every file whole (equal to the sequential run's) or absent, and no temporary
    file left behind."""
    from PIL import Image

    inputs = []
    for i in range(7):
        name = ("chelsea", "coffee", "astronaut", "rocket")[i % 4]
        path = tmp_path / "in" / f"{i}_{name}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(photos[name]).save(path)
        inputs.append(str(path))
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"not a picture")
    inputs.insert(3, str(broken))
    settings = JobSettings(target=parse_target("top2", linear_model.labels), formats=("npy", "heatmap", "overlay"),
                           render=RenderOptions(), batch_size=2)
    runs = {}
    for overlap in (False, True):
        out = tmp_path / f"overlap_{overlap}"
        done = list(explain_and_write(linear_model, inputs, OutputLayout(out, inputs), settings, overlap=overlap))
        records = [d.record for d in done]
        for record in records:
            for m in record["maps"]:
                m["files"] = {k: v.replace(str(out), "OUT") for k, v in m["files"].items()}
        runs[overlap] = records, _outputs(out)
    assert [r["path"] for r in runs[True][0]] == inputs, "records come in input order"
    assert runs[True][0] == runs[False][0], "records differ from writing in turn"
    assert runs[True][1] == runs[False][1], "files differ from writing in turn"
    assert runs[True][0][3]["error"].startswith("not an image"), runs[True][0][3]

    stopped = tmp_path / "stopped"
    job = explain_and_write(linear_model, inputs, OutputLayout(stopped, inputs), settings)
    first = next(job)
    job.close()  # the caller stops after one record
    assert first.record["path"] == inputs[0]
    left = _outputs(stopped)
    assert left, "the first picture's files are written"
    assert not [name for name in left if name.endswith(".tmp")], "a temporary file was left behind"
    for name, data in left.items():
        assert runs[False][1][name] == data, f"{name} is not whole"
    assert len(left) < len(runs[False][1]), "the writes not started when the caller stopped were dropped"


class _Log:
    """A RunReporter that writes down what it is told."""

    def __init__(self):
        self.events = []

    def input_error(self, spec, reason):
        self.events.append(("input_error", spec, reason))

    def started(self, total):
        self.events.append(("started", total))

    def picture_done(self, record):
        self.events.append(("picture_done", record["path"], record["error"] is None))


def test_run_job_is_gradmap_run(linear_model, photo_files, tmp_path):
    """run_job's summary is the document gradmap run --json prints, its exit code gradmap run's, and
    its files gradmap run's; the reporter hears of every input as gradmap run prints it."""
    from gradmap.runtime.jobs import run_job

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture")
    inputs = [*map(str, photo_files), str(broken), str(tmp_path / "missing.png")]
    cli = CliRunner().invoke(main, ["run", str(LINEAR_MODEL), *inputs, "--out", str(tmp_path / "cli"), "--json",
                                    "--format", "npy,overlay", "--method", "smoothgrad", "--samples", "3",
                                    "--provider", "cpu", "--threads", "1"])
    assert cli.exit_code == 1, cli.output
    from gradmap.runtime.methods import MethodSpec

    log = _Log()
    summary = run_job(linear_model, inputs, out_dir=tmp_path / "job", method=MethodSpec("smoothgrad", samples=3),
                      formats=("npy", "overlay"), keep_records=True, reporter=log)
    document = json.loads(json.dumps(summary.to_json()).replace(str(tmp_path / "job"), str(tmp_path / "cli")))
    expected = json.loads(cli.stdout)
    expected["model"] = linear_model.path
    assert document == expected, "run_job's summary differs from gradmap run --json"
    assert summary.exit_code == 1 and (summary.failed, summary.inputs, summary.skipped) == (2, 4, 0)
    assert _outputs(tmp_path / "job") == _outputs(tmp_path / "cli")
    assert log.events == [("input_error", str(tmp_path / "missing.png"), "no such file or directory"), ("started", 3),
                          *(("picture_done", p, p != str(broken)) for p in inputs[:3])]
    again = run_job(linear_model, inputs[:2], out_dir=tmp_path / "job", method=MethodSpec("smoothgrad", samples=3),
                    formats=("npy", "overlay"), skip_existing=True)
    assert (again.skipped, again.inputs, again.exit_code, again.records) == (2, 2, 0, [])


def test_run_job_checks_target_and_method_before_anything(linear_model, photo_files, tmp_path):
    from gradmap.runtime import TargetError
    from gradmap.runtime.jobs import run_job
    from gradmap.runtime.methods import UnsupportedMethodError

    with pytest.raises(TargetError, match="no class named 'zebra'"):
        run_job(linear_model, [str(photo_files[0])], out_dir=tmp_path / "a", target="zebra")
    with pytest.raises(UnsupportedMethodError, match="export it with --cam-layer auto"):
        run_job(linear_model, [str(photo_files[0])], out_dir=tmp_path / "b", method="grad-cam")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_job_lists_an_unordered_engines_records_in_input_order(linear_model, photo_files, tmp_path):
    """Records of an engine that yields them as pictures finish (Ray's) are listed in input order."""
    from gradmap.runtime.jobs import LocalEngine, run_job

    class Reversed(LocalEngine):
        ordered = False

        def records(self, paths, settings, layout):
            return reversed(list(super().records(paths, settings, layout)))

    inputs = [str(p) for p in photo_files]
    log = _Log()
    summary = run_job(linear_model, inputs, out_dir=tmp_path, formats=("npy",), engine=Reversed(linear_model),
                      keep_records=True, reporter=log)
    assert [r["path"] for r in summary.records] == inputs
    assert [e[1] for e in log.events if e[0] == "picture_done"] == inputs[::-1], "the reporter hears them as they come"


def test_rendering_returns_what_io_writes(linear_model, photo_files, tmp_path):
    """render_outputs draws every output and returns it; io writes it, byte for byte what was drawn,
    and imports nothing that draws or computes maps."""
    import ast
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from gradmap import contract
    from gradmap.runtime import compute_saliency, render_outputs, write_outputs

    result = compute_saliency(linear_model, str(photo_files[0]), target="top1")
    drawn = dict(render_outputs(result, result.maps[0], contract.OUTPUT_FORMATS, caption="c"))
    written = write_outputs(result, result.maps[0], OutputLayout(tmp_path, [str(photo_files[0])]),
                            contract.OUTPUT_FORMATS, caption="c")
    assert list(drawn) == list(written) == ["heatmap", "overlay", "figure", "gradient", "map"]
    for kind, output in drawn.items():
        if isinstance(output, Image.Image):
            with Image.open(written[kind]) as saved:
                assert saved.mode == output.mode and saved.tobytes() == output.tobytes(), kind
        else:
            assert np.array_equal(np.load(written[kind]), output), kind
    with pytest.raises(ValueError, match="unknown output format gif"):
        render_outputs(result, result.maps[0], ["gif"])
    io = Path(__file__).resolve().parent.parent / "gradmap" / "runtime" / "io.py"
    imported = {node.module for node in ast.walk(ast.parse(io.read_text())) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"gradmap.runtime.render", "gradmap.runtime.postprocess", "gradmap.runtime.colormaps",
                           "gradmap.runtime.saliency"}, f"io draws or computes: it imports {sorted(imported)}"


# -- a failed picture is freed with its result ---------------------------------------------------------------------
def _alive(*kinds: type) -> list:
    """Errors of ``kinds`` and pictures of the truncated photo's size that are still alive."""
    return [o for o in gc.get_objects() if isinstance(o, kinds) or (isinstance(o, Image.Image) and o.size == TRUNCATED)]


@pytest.fixture
def no_cyclic_collector():
    """The cyclic garbage collector off: what is still alive then is held, or in a reference cycle."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


TRUNCATED = (1600, 1200)


def _truncated_photo(photos) -> bytes:
    buffer = io.BytesIO()  # 1200 x 1600: PIL allocates the whole 5.8 MB picture before the data runs out
    Image.fromarray(np.tile(photos["chelsea"], (4, 4, 1))[:TRUNCATED[1], :TRUNCATED[0]]).save(buffer, format="JPEG",
                                                                                           quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def test_no_error_outlives_its_picture(linear_model, photos, photo_files, tmp_path, monkeypatch,
                                       no_cyclic_collector):
    """A picture that fails (truncated, or a NaN gradient) gives a result whose error is freed with the
    result, and the partly decoded picture with it, with the cyclic collector off. Before, the error's
    traceback reached the frame that stored it beside the batch (a reference cycle) and, through its
    cause, PIL's frames holding the partly decoded picture: each batch with a failure stayed in memory
    until the collector ran: the last batch of every call, and gradmap serve and Ray's actors make one
    call per batch."""

    truncated = _truncated_photo(photos)
    good = photo_files[0].read_bytes()
    # batches of 3: good, bad, bad | good, bad, bad | good, bad -- the last batch too has a failure
    sources = [EncodedPicture(f"p{i}.jpg", truncated if i % 3 else good) for i in range(8)]
    assert _alive(ImageLoadError) == []
    failed = 0
    for result in iter_saliency(linear_model, sources, batch_size=3):
        failed += not result.ok
        del result
    assert failed == 5
    assert _alive(ImageLoadError) == [], "iter_saliency: a failed picture outlived its result"

    # gradmap run's job, from files (the error becomes the record's text; the result is dropped)
    for i, source in enumerate(sources):
        (tmp_path / source.path).write_bytes(source.data)
    paths = [str(tmp_path / s.path) for s in sources]
    settings = JobSettings(target=parse_target("top1", linear_model.labels), formats=("npy",))
    records = [d.record for d in explain_and_write(linear_model, paths, OutputLayout(tmp_path / "out", paths),
                                                   settings)]
    assert sum(r["error"] is not None for r in records) == 5
    assert _alive(ImageLoadError) == [], "explain_and_write: a failed picture outlived its record"

    # a NaN gradient: the error raised inside the batch's postprocessing, which holds the batch's arrays
    original = SaliencyModel.run

    def nan_run(self, images, targets=None):
        out = original(self, images, targets)
        gradient = out.gradient.copy()
        gradient[-1, 0, 0, 0] = np.nan
        return ModelOutputs(out.logits, out.target_index, gradient)

    monkeypatch.setattr(SaliencyModel, "run", nan_run)
    for result in iter_saliency(linear_model, photo_files[:2], batch_size=2):
        failed = isinstance(result.error, NonFiniteGradientError) or failed
        del result
    assert failed is True
    assert _alive(NonFiniteGradientError) == [], "a NaN gradient's error outlived its result"


def test_a_kept_error_still_says_what_failed_and_why(photos, tmp_path):
    """The error on a failed result has no traceback (errors.detached), but its message and its
    cause's type and message stay; raising it again gives a traceback from there."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(_truncated_photo(photos))
    with pytest.raises(ImageLoadError, match="cannot decode image: image file is truncated") as info:
        compute_saliency(LINEAR_MODEL, str(broken))
    assert isinstance(info.value.__cause__, OSError) and "truncated" in str(info.value.__cause__)
    assert info.value.__cause__.__traceback__ is None
    assert info.value.__traceback__ is not None, "the raise in compute_saliency gives a traceback of its own"
