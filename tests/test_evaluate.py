"""gradmap evaluate: reading evaluation data, per-method metrics and the sanity-check verdict (torch-free).

The metric functions themselves are checked against Quantus in tests/test_metrics.py; here the
question is whether ``evaluate`` feeds them the right maps, masks and targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gradmap.cli import main
from gradmap.demo import demo_assets
from gradmap.contract import Preprocessing
from gradmap.runtime.evaluate import (
    EvaluationDataError,
    _mask_on_input,
    evaluate,
    format_report,
    load_evaluation_data,
    saliency_maps,
)
from gradmap.runtime.methods import MethodSpec
from gradmap.runtime.metrics import energy_pointing_game, pointing_game, rank_correlation
from gradmap.runtime.preprocess import CropGeometry, preprocess

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
CLASSES = ("circle", "square", "triangle", "cross", "star")


def _demo_files():
    assets = demo_assets()
    model = Path(str(assets.joinpath("shapes.onnx")))
    randomized = Path(str(assets.joinpath("shapes_randomized_top.onnx")))
    if not model.is_file() or not (DEMO / "eval_set.npz").is_file():
        pytest.skip("demo model not generated (python models/make_demo.py)")
    return model, randomized, DEMO / "eval_set.npz"


def _write_dataset(root: Path, n: int = 3, size: int = 64) -> list[np.ndarray]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    masks = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"p{i}.png")
        mask = np.zeros((size, size), dtype=bool)
        mask[10 + i:30 + i, 20:40] = True
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"p{i}.png")
        masks.append(mask)
    (root / "labels.csv").write_text("name,label\np0.png,circle\np1,3\np2.png,star\n")
    return masks


PRE_64 = Preprocessing(crop=(64, 64), resize=None, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_directory_with_labels_is_read_as_the_model_sees_it(tmp_path):
    masks = _write_dataset(tmp_path)
    data = load_evaluation_data(tmp_path, PRE_64, CLASSES)
    assert data.names == ["p0.png", "p1.png", "p2.png"]
    np.testing.assert_array_equal(data.labels, [0, 3, 4])
    np.testing.assert_array_equal(data.masks, np.stack(masks))
    expected, _ = preprocess(Image.open(tmp_path / "images" / "p1.png").convert("RGB"), PRE_64)
    np.testing.assert_array_equal(data.images[1], expected)
    assert data.notes == []


def test_without_labels_the_top1_class_is_explained_and_said(tmp_path):
    _write_dataset(tmp_path)
    (tmp_path / "labels.csv").unlink()
    data = load_evaluation_data(tmp_path, PRE_64, CLASSES)
    assert (data.labels == -1).all()
    assert "top-1" in data.notes[0]


def test_mask_follows_resize_and_crop():
    # 100 x 60 picture, resize shorter side to 30 (-> 50 x 30), center crop 20 x 20 (top 15, left 5)
    mask = np.zeros((100, 60), dtype=bool)
    mask[40:60, 20:40] = True  # resized: rows 20:30, cols 10:20; cropped: rows 5:15, cols 5:15
    geometry = CropGeometry((100, 60), (50, 30), 15, 5, (20, 20))
    expected = np.zeros((20, 20), dtype=bool)
    expected[5:15, 5:15] = True
    np.testing.assert_array_equal(_mask_on_input(mask, geometry), expected)


def test_every_problem_is_reported_at_once(tmp_path):
    _write_dataset(tmp_path, n=4)
    (tmp_path / "masks" / "p0.png").unlink()                                               # missing mask
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "masks" / "p1.png")      # empty mask
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "masks" / "p2.png")  # wrong size
    (tmp_path / "labels.csv").write_text("p0.png,circle\np1.png,circle\np2.png,circle\np3.png,hexagon\n")
    with pytest.raises(EvaluationDataError) as info:
        load_evaluation_data(tmp_path, PRE_64, CLASSES)
    message = str(info.value)
    assert "4 problem(s)" in message
    assert "p0.png: no mask" in message
    assert "p1.png: the object mask is empty" in message
    assert "mask is 32x32 pixels, the picture 64x64" in message
    assert "'hexagon' is neither one of the model's classes nor an index" in message


@pytest.mark.parametrize("content, reason", [
    ({"images": np.zeros((2, 8, 8), np.uint8), "masks": np.ones((2, 8, 8), bool)}, "uint8 [N, H, W, 3]"),
    ({"images": np.zeros((2, 8, 8, 3), np.uint8), "masks": np.ones((2, 8, 9), bool)}, "'masks' must be [N, H, W]"),
    ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "not an evaluation .npz"),
])
def test_malformed_npz_is_refused_with_the_reason(tmp_path, content, reason):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    with pytest.raises(EvaluationDataError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        load_evaluation_data(path, PRE_64, CLASSES)


def test_metrics_are_those_of_the_methods_maps():
    model_file, randomized_file, npz = _demo_files()
    from gradmap.runtime import SaliencyModel

    model = SaliencyModel(model_file, provider="cpu", threads=1)
    data = load_evaluation_data(npz, model.metadata.preprocessing, model.metadata.labels, limit=6)
    specs = [MethodSpec("vanilla"), MethodSpec("grad-cam")]
    results = evaluate(model, data, specs, randomized=model, steps=8, random_repeats=1, tolerance=2.0)
    assert results["images"] == 6
    assert results["settings"]["pointing_tolerance_px"] == 2.0
    assert results["chance_tolerance"]["mean"] > results["chance"]["mean"], "the dilated object covers more"
    for spec in specs:
        maps, targets = saliency_maps(model, spec, data.images, data.labels)
        np.testing.assert_array_equal(targets, data.labels)
        assert maps.shape == data.masks.shape
        entry = results["methods"][spec.name]
        assert entry["pointing_game"]["mean"] == pytest.approx(
            np.mean([pointing_game(m, k) for m, k in zip(maps, data.masks)]))
        assert entry["pointing_game_tolerance"]["mean"] == pytest.approx(
            np.mean([pointing_game(m, k, tolerance=2.0) for m, k in zip(maps, data.masks)]))
        assert entry["energy_pointing_game"]["mean"] == pytest.approx(
            np.mean([energy_pointing_game(m, k) for m, k in zip(maps, data.masks)]))
        # the model against itself: identical maps, rank correlation 1, which fails the sanity check
        assert entry["rank_correlation"]["mean"] == pytest.approx(1.0)
        assert entry["sanity_check"] == "FAILED"
        assert entry["rank_correlation_other_image"]["mean"] == pytest.approx(
            np.mean([rank_correlation(maps[i], maps[(i + 1) % 6]) for i in range(6)]))
        assert entry["rank_correlation_other_image"]["mean"] < 0.99, "other images' maps are not the same map"
        assert 0.0 <= entry["deletion_auc"]["mean"] <= 1.0 and 0.0 <= entry["insertion_auc"]["mean"] <= 1.0


def test_cascade_rho_is_the_check_against_each_model():
    """Each cascade model gets the rho the check would give it; the verdict stays the top model's."""
    model_file, randomized_file, npz = _demo_files()
    from gradmap.runtime import SaliencyModel

    model = SaliencyModel(model_file, provider="cpu", threads=1)
    randomized = SaliencyModel(randomized_file, provider="cpu", threads=1)
    data = load_evaluation_data(npz, model.metadata.preprocessing, model.metadata.labels, limit=5)
    results = evaluate(model, data, [MethodSpec("vanilla")], randomized=randomized,
                       cascade=[("again", randomized), ("itself", model)], steps=4, random_repeats=1)
    entry = results["methods"]["vanilla"]
    cascade = entry["rank_correlation_cascade"]
    assert list(cascade) == ["again", "itself"]
    assert cascade["again"]["mean"] == pytest.approx(entry["rank_correlation"]["mean"], abs=1e-12)
    assert cascade["itself"]["mean"] == pytest.approx(1.0) and cascade["itself"]["n"] == 5
    maps = saliency_maps(model, MethodSpec("vanilla"), data.images, data.labels)[0]
    other = saliency_maps(randomized, MethodSpec("vanilla"), data.images, data.labels)[0]
    assert entry["rank_correlation"]["mean"] == pytest.approx(np.mean([rank_correlation(a, b) for a, b in zip(maps, other)]))
    assert entry["sanity_check"] == ("passed" if entry["rank_correlation"]["mean"] <= 0.3 else "FAILED")
    report = format_report(results)
    assert "randomization cascade" in report and "itself" in report


def test_seed_check_compares_maps_drawn_from_another_seed():
    """With seed_check, a seeded method is also compared with the randomized model's map drawn from
    the next seed, and with the trained model's own map from that seed; a method without a seed
    gets neither."""
    model_file, randomized_file, npz = _demo_files()
    from gradmap.runtime import SaliencyModel

    model = SaliencyModel(model_file, provider="cpu", threads=1)
    randomized = SaliencyModel(randomized_file, provider="cpu", threads=1)
    data = load_evaluation_data(npz, model.metadata.preprocessing, model.metadata.labels, limit=3)
    specs = [MethodSpec("rise", masks=40, seed=3), MethodSpec("vanilla")]
    results = evaluate(model, data, specs, randomized=randomized, steps=4, random_repeats=1, seed_check=True)
    entry = results["methods"]["rise"]
    maps = saliency_maps(model, specs[0], data.images, data.labels)[0]
    seed4 = MethodSpec("rise", masks=40, seed=4)
    other = saliency_maps(randomized, seed4, data.images, data.labels)[0]
    again = saliency_maps(model, seed4, data.images, data.labels)[0]
    assert entry["rank_correlation_other_seed"]["mean"] == pytest.approx(
        np.mean([rank_correlation(a, b) for a, b in zip(maps, other)]))
    assert entry["rank_correlation_seed_to_seed"]["mean"] == pytest.approx(
        np.mean([rank_correlation(a, b) for a, b in zip(maps, again)]))
    assert entry["rank_correlation_seed_to_seed"]["mean"] < 0.999, "seed 4 draws other masks than seed 3"
    assert "rank_correlation_other_seed" not in results["methods"]["vanilla"]
    assert "from the next seed" in format_report(results)


def test_cli_evaluate_writes_json_and_flags_failures(tmp_path):
    model_file, randomized_file, npz = _demo_files()
    out = tmp_path / "quality.json"
    runner = CliRunner()
    args = ["evaluate", str(model_file), "--data", str(npz), "--limit", "4", "--method", "vanilla",
            "--method", "grad-cam", "--curve-steps", "8", "--random-repeats", "1", "--threads", "1",
            "--json", str(out)]
    result = runner.invoke(main, [*args, "--randomized", str(model_file), "--strict"])
    assert result.exit_code == 1, result.output
    assert "randomization sanity check failed: vanilla, grad-cam" in result.output
    results = json.loads(out.read_text())
    assert set(results["methods"]) == {"vanilla", "grad-cam"} and results["images"] == 4

    result = runner.invoke(main, [*args, "--randomized", str(randomized_file), "--tolerance", "2"])
    assert result.exit_code == 0, result.output
    assert "pointing" in result.output and "grad-cam" in result.output
    assert "<=2 px" in result.output
    assert json.loads(out.read_text())["methods"]["vanilla"]["pointing_game_tolerance"]["n"] == 4

    result = runner.invoke(main, [*args, "--tolerance", "-1"])
    assert result.exit_code == 2 and "--tolerance" in result.output

    result = runner.invoke(main, [*args, "--randomized", str(randomized_file), "--cascade", str(model_file)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["cascade_models"] == [str(model_file)]
    assert written["methods"]["grad-cam"]["rank_correlation_cascade"][model_file.stem]["mean"] == pytest.approx(1.0)
    copy = tmp_path / "copy" / model_file.name
    copy.parent.mkdir()
    copy.write_bytes(model_file.read_bytes())
    result = runner.invoke(main, [*args, "--cascade", str(model_file), "--cascade", str(copy)])
    assert result.exit_code == 2 and "same file name" in result.output


def test_cli_evaluate_names_a_method_the_model_lacks(tmp_path):
    model_file, _, npz = _demo_files()
    from gradmap.runtime import SaliencyModel

    if "grad-cam" not in SaliencyModel(model_file, provider="cpu").metadata.methods:
        pytest.skip("demo model exported without a CAM layer")
    _write_dataset(tmp_path / "data")
    result = CliRunner().invoke(main, ["evaluate", str(model_file), "--data", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "data" / "masks" / "p2.png").unlink()
    result = CliRunner().invoke(main, ["evaluate", str(model_file), "--data", str(tmp_path / "data")])
    assert result.exit_code == 1 and "p2.png: no mask" in result.output
