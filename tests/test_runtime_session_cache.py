"""The session cache (gradmap/runtime/_session_cache.py): onnxruntime's optimized graph of a model
marked by its first session, saved by the second and read by later ones, with the same outputs bit for bit; a changed
model, a damaged entry or an unwritable folder never gives a wrong or failed load."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gradmap.runtime import SaliencyModel
from gradmap.runtime._session_cache import CACHE_ENV, cache_root

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo" / "shapes.onnx"


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model" / "shapes.onnx"
    path.parent.mkdir()
    shutil.copyfile(DEMO, path)
    return path


def _outputs(model: SaliencyModel) -> dict[str, np.ndarray]:
    images = np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32)
    return model.run_outputs(images, np.asarray([-1, 2, 4], dtype=np.int64), ("logits", "target_index", "gradient"))


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def test_a_later_session_reads_the_saved_graph_and_gives_the_same_outputs(model_file, tmp_path):
    cache = tmp_path / "cache"
    plain = SaliencyModel(model_file, provider="cpu", threads=1, cache_dir=False)
    first = SaliencyModel(model_file, provider="cpu", threads=1, cache_dir=cache)
    assert not _entries(cache), "a model's first session leaves only a mark"
    second = SaliencyModel(model_file, provider="cpu", threads=1, cache_dir=cache)
    later = SaliencyModel(model_file, provider="cpu", threads=1, cache_dir=cache)
    assert [m.cache_state for m in (plain, first, second, later)] == ["off", "marked", "written", "read"]
    (entry,) = _entries(cache)
    assert (entry / "model.onnx").is_file() and (entry / "model.data").is_file()
    assert not list(cache.glob(".*.seen")), "the mark goes once the entry is there"
    assert later.metadata == plain.metadata and later.labels == plain.labels
    expected = _outputs(plain)
    for model in (first, second, later):
        for name, value in _outputs(model).items():
            np.testing.assert_array_equal(value, expected[name], err_msg=f"{model.cache_state}: {name}")


def _cached(path: Path, cache: Path) -> SaliencyModel:
    """The model through ``cache``, loaded until its entry is there (a mark, then the entry)."""
    model = SaliencyModel(path, provider="cpu", cache_dir=cache)
    return SaliencyModel(path, provider="cpu", cache_dir=cache) if model.cache_state == "marked" else model


def test_a_rewritten_model_gets_a_new_entry_and_the_old_one_goes(model_file, tmp_path):
    cache = tmp_path / "cache"
    _cached(model_file, cache)
    (old,) = _entries(cache)
    other = DEMO.parent / "shapes_randomized_top.onnx"  # another model written over the same path
    shutil.copyfile(other, model_file)
    assert SaliencyModel(model_file, provider="cpu", cache_dir=cache).cache_state == "marked"
    reloaded = SaliencyModel(model_file, provider="cpu", cache_dir=cache)
    assert reloaded.cache_state == "written"
    (new,) = _entries(cache)
    assert new != old
    for name, value in _outputs(reloaded).items():
        np.testing.assert_array_equal(value, _outputs(SaliencyModel(other, provider="cpu", cache_dir=False))[name])


def test_a_damaged_entry_is_replaced_and_the_model_loads_from_its_file(model_file, tmp_path):
    cache = tmp_path / "cache"
    expected = _outputs(_cached(model_file, cache))
    (entry,) = _entries(cache)
    (entry / "model.onnx").write_bytes(b"\x08\x07garbage")
    model = SaliencyModel(model_file, provider="cpu", cache_dir=cache)
    assert model.cache_state == "written"
    for name, value in _outputs(model).items():
        np.testing.assert_array_equal(value, expected[name])
    assert SaliencyModel(model_file, provider="cpu", cache_dir=cache).cache_state == "read"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_cache_costs_only_the_saving(model_file, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        model = SaliencyModel(model_file, provider="cpu", cache_dir=cache)
    finally:
        cache.chmod(0o700)
    assert model.cache_state == "unwritable"
    assert _outputs(model)["gradient"].shape == (3, 3, 64, 64)


def test_a_cache_path_that_is_a_file_costs_only_the_saving(model_file, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    model = SaliencyModel(model_file, provider="cpu", cache_dir=blocker / "cache")
    assert model.cache_state == "unwritable"
    assert SaliencyModel(model_file, provider="cpu", cache_dir=blocker / "cache").cache_state == "unwritable"
    np.testing.assert_array_equal(_outputs(model)["gradient"],
                                  _outputs(SaliencyModel(model_file, provider="cpu", cache_dir=False))["gradient"])


def test_a_model_that_does_not_load_fails_as_without_a_cache(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(DEMO.read_bytes()[:5000])
    from gradmap.runtime.errors import GradmapModelError

    with pytest.raises(GradmapModelError) as with_cache:
        SaliencyModel(broken, provider="cpu", cache_dir=tmp_path / "cache")
    with pytest.raises(GradmapModelError) as with_cache:  # its second load tries to save an entry
        SaliencyModel(broken, provider="cpu", cache_dir=tmp_path / "cache")
    with pytest.raises(GradmapModelError) as without:
        SaliencyModel(broken, provider="cpu", cache_dir=False)
    assert str(with_cache.value) == str(without.value)
    assert not _entries(tmp_path / "cache")


def test_the_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "here"))
    assert cache_root() == tmp_path / "here"
    for off in ("off", "0", ""):
        monkeypatch.setenv(CACHE_ENV, off)
        assert cache_root() is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "gradmap" / "onnxruntime"
    assert cache_root(False) is None and cache_root(tmp_path) == tmp_path


def test_entries_name_their_model_and_go_with_it(model_file, tmp_path):
    from gradmap.runtime._session_cache import clear_entries, list_entries

    cache = tmp_path / "cache"
    _cached(model_file, cache)
    (entry,) = list_entries(cache)
    assert entry["model"] == os.path.realpath(model_file) and entry["model_exists"] and entry["bytes"] > 1e6
    assert clear_entries(cache, stale_only=True) == (0, 0)
    other = tmp_path / "other" / "shapes.onnx"
    other.parent.mkdir()
    shutil.copyfile(DEMO, other)
    model_file.unlink()  # the first model is deleted: the next entry written takes its entry along
    _cached(other, cache)
    assert [e["model"] for e in list_entries(cache)] == [os.path.realpath(other)]
    other.unlink()
    removed, freed = clear_entries(cache, stale_only=True)
    assert removed == 1 and freed > 1e6 and list_entries(cache) == []


def test_the_cache_commands_list_and_clear(model_file, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from gradmap.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    runner = CliRunner()
    info = runner.invoke(main, ["info", str(model_file)])
    assert info.exit_code == 0, info.output
    assert not cache.exists() or not any(cache.iterdir()), "gradmap info saves nothing in the cache"
    _cached(model_file, cache)
    listed = runner.invoke(main, ["cache", "list"])
    assert listed.exit_code == 0 and os.path.realpath(model_file) in listed.output and "1 entries" in listed.output
    cleared = runner.invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 1 entries" in cleared.output
    assert list(cache.iterdir()) == []
    monkeypatch.setenv(CACHE_ENV, "off")
    assert "off" in runner.invoke(main, ["cache", "list"]).output


def test_a_rewritten_external_data_file_gets_a_new_entry(tmp_path):
    onnx = pytest.importorskip("onnx")
    folder = tmp_path / "external"
    folder.mkdir()
    model_file = folder / "shapes.onnx"
    proto = onnx.load(str(DEMO))
    onnx.save_model(proto, str(model_file), save_as_external_data=True, location="shapes.onnx.data", size_threshold=1024)
    cache = tmp_path / "cache"
    before = _outputs(_cached(model_file, cache))
    data = folder / "shapes.onnx.data"
    weights = bytearray(data.read_bytes())
    weights[:4096] = bytes(4096)  # other weights, the same size, the .onnx file untouched
    data.write_bytes(bytes(weights))
    assert SaliencyModel(model_file, provider="cpu", cache_dir=cache).cache_state == "marked"
    after = _outputs(SaliencyModel(model_file, provider="cpu", cache_dir=False))
    assert not np.array_equal(after["gradient"], before["gradient"]), "the changed weights change nothing"
    np.testing.assert_array_equal(_outputs(_cached(model_file, cache))["gradient"], after["gradient"])
