"""The per-picture job shared by `gradmap run` and the Ray workers (gradmap.runtime.jobs)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import LINEAR_MODEL
from gradmap.cli import main
from gradmap.runtime import (EncodedPicture, ImageLoadError, JobSettings, OutputLayout, explain_and_write, open_picture,
                             parse_target)
from gradmap.runtime.io import RenderOptions


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
