"""Forward-only methods (occlusion, RISE, Score-CAM) and the CAM family (HiResCAM, XGradCAM, LayerCAM,
EigenCAM), torch-free: exact values on the linear fixture, the demo model through the CLI, bad settings.
tests/test_methods_forward_crosscheck.py compares them with Captum, pytorch-grad-cam and a re-implementation
of RISE from the paper."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import LINEAR_MODEL  # noqa: I001
from gradmap import contract
from gradmap.cli import main
from gradmap.runtime import perturbation
from gradmap.runtime.cam import eigen_cam, hires_cam, layer_cam, xgrad_cam
from gradmap.runtime.methods import MethodSpec, UnsupportedMethodError, attribute, baseline_image


CAMS = ("hirescam", "xgrad-cam", "layer-cam", "eigen-cam", "score-cam")


@pytest.fixture()
def batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 3, 32, 32)).astype(np.float32), np.array([-1, 2], dtype=np.int64)


def test_occlusion_windows_are_placed_as_captum_places_them():
    # starts 0, stride, ... ceil((size - window) / stride) of them after the first; the last is cut at the edge
    windows = perturbation.occlusion_windows((32, 20), window=6, stride=4)
    tops = sorted({w[0] for w in windows})
    lefts = sorted({w[2] for w in windows})
    assert tops == [0, 4, 8, 12, 16, 20, 24, 28] and lefts == [0, 4, 8, 12, 16]
    assert (28, 32, 16, 20) in windows and len(windows) == 8 * 5
    assert perturbation.occlusion_windows((8, 8), window=8, stride=3) == [(0, 8, 0, 8)]


def test_occlusion_on_a_linear_model_is_the_mean_window_drop(linear_model, linear_weights, batch):
    """S(x) - S(x occluded) = sum over the window of W[t] (x - x0) for a linear score."""
    W, _ = linear_weights
    images, targets = batch
    spec = MethodSpec("occlusion", window=5, stride=3, baseline="blurred", mask_batch=7)
    logits, index, values, gap = attribute(linear_model, spec, images, targets)
    assert gap is None and values.shape == images.shape
    pre = linear_model.metadata.preprocessing
    x0 = baseline_image(images, "blurred", pre.mean, pre.std)
    contribution = (W[index].reshape(2, 3, 32, 32) * (images - x0)).sum(1)  # [N, H, W]
    expected = np.zeros((2, 32, 32))
    counts = np.zeros((32, 32))
    for top in range(0, 28, 3):  # 0..27: ceil(27 / 3) + 1 = 10 windows per side, the last one ends at 32
        for left in range(0, 28, 3):
            window = (slice(None), slice(top, top + 5), slice(left, left + 5))
            expected[window] += contribution[window].sum((1, 2))[:, None, None]
            counts[window[1:]] += 1
    expected /= counts
    for channel in range(3):
        np.testing.assert_allclose(values[:, channel], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # the masked copies per run change nothing
    _, _, again, _ = attribute(linear_model, MethodSpec("occlusion", window=5, stride=3, baseline="blurred",
                                                        mask_batch=1), images, targets)
    np.testing.assert_allclose(again, values, rtol=1e-5, atol=1e-7)


def test_rise_is_seeded_and_independent_of_the_masks_per_run(linear_model, batch):
    images, targets = batch
    first = attribute(linear_model, MethodSpec("rise", masks=40, grid=4, mask_batch=0, seed=3), images, targets)[2]
    again = attribute(linear_model, MethodSpec("rise", masks=40, grid=4, mask_batch=6, seed=3), images, targets)[2]
    other = attribute(linear_model, MethodSpec("rise", masks=40, grid=4, seed=4), images, targets)[2]
    assert first.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-7)
    assert np.abs(other - first).max() > 1e-3 * np.abs(first).max()


def test_rise_of_a_constant_score_is_the_mean_mask_over_p(batch):
    """With every mask weighted by the same probability q, saliency = q * mean(M) / p: about q."""

    class Constant:  # a model whose class probabilities ignore the input
        from gradmap.contract import OUTPUT_LOGITS, OUTPUT_TARGET_INDEX

        def run_outputs(self, images, targets, outputs):
            logits = np.tile(np.array([[0.0, np.log(3.0)]], np.float32), (len(images), 1))
            return {self.OUTPUT_LOGITS: logits, self.OUTPUT_TARGET_INDEX: np.full(len(images), 1, np.int64)}

        def logits(self, images):
            return self.run_outputs(images, None, ())[self.OUTPUT_LOGITS]

        def checked_targets(self, n, targets):
            return np.asarray(targets, np.int64)

    images = batch[0][:1]
    result = perturbation.rise(Constant(), images, np.array([1]), np.zeros_like(images), masks=3000, grid=4,
                               probability=0.3, seed=0)
    assert abs(result.values.mean() - 0.75) < 0.02, result.values.mean()  # q = 3 / (1 + 3)


def test_rise_masks_upsample_as_scikit_image_resizes():
    from skimage.transform import resize

    rng = np.random.default_rng(1)
    grids = (rng.random((3, 5, 5)) < 0.5).astype(np.float32)
    shifts = np.array([[0, 0], [3, 1], [6, 6]])
    masks = perturbation.rise_masks(grids, shifts, (30, 30))  # cells of 6 px, upsampled to 36 x 36
    for grid, (dy, dx), mask in zip(grids, shifts, masks):
        up = resize(grid, (36, 36), order=1, mode="reflect", anti_aliasing=False)
        np.testing.assert_allclose(mask, up[dy:dy + 30, dx:dx + 30], atol=1e-6)


@pytest.mark.parametrize("cam", [hires_cam, xgrad_cam, layer_cam])
def test_gradient_cams_of_one_channel(cam):
    # one channel with a constant gradient g: HiResCAM and LayerCAM are g A (LayerCAM: ReLU(g) A),
    # XGradCAM's weight is sum(g A) / sum(A) = g; all three are Grad-CAM's map there
    rng = np.random.default_rng(0)
    a = rng.random((1, 1, 4, 5)) + 0.1
    for g in (0.7, -0.7):
        maps = cam(a, np.full_like(a, g))
        np.testing.assert_allclose(maps, np.maximum(g * a[:, 0], 0), rtol=1e-6)


def test_cams_differ_where_the_gradient_varies():
    a = np.array([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 1.0], [1.0, 1.0]]]])
    g = np.array([[[[1.0, -1.0], [0.5, 0.0]], [[-2.0, 2.0], [0.0, 1.0]]]])
    np.testing.assert_allclose(hires_cam(a, g, relu=False), [[[1 - 8, -2 + 2], [1.5, 1]]])
    np.testing.assert_allclose(layer_cam(a, g), [[[1, 2], [1.5, 1]]])
    w = [(1 - 2 + 1.5) / 10, (-8 + 2 + 1) / 7]
    np.testing.assert_allclose(xgrad_cam(a, g, relu=False), [[[w[0] * 1 + w[1] * 4, w[0] * 2 + w[1]],
                                                              [w[0] * 3 + w[1], w[0] * 4 + w[1]]]], rtol=1e-6)


def test_eigen_cam_is_the_first_principal_component():
    # activations that vary along one direction v over the map: the projection is +-(t - mean t) |v|
    t = np.arange(12.0).reshape(3, 4)
    v = np.array([1.0, -2.0, 0.5])
    a = (v[:, None, None] * t)[None] + 5.0
    maps = eigen_cam(a, relu=False, orientation="svd")[0]
    expected = (t - t.mean()) * np.linalg.norm(v)
    assert np.allclose(maps, expected, atol=1e-4) or np.allclose(maps, -expected, atol=1e-4)
    # gradmap's default orientation: the direction whose loadings sum >= 0, here -v / |v| (v sums to -0.5)
    np.testing.assert_allclose(eigen_cam(a, relu=False)[0], -expected, atol=1e-4)
    # -v sums to +0.5: the map of -v t is +(t - mean t) |v|, where the activations grow
    np.testing.assert_allclose(eigen_cam(-a + 20, relu=False)[0], expected, atol=1e-4)
    w = np.array([2.0, 1.0, 0.5])
    np.testing.assert_allclose(eigen_cam((w[:, None, None] * t)[None], relu=False)[0],
                               (t - t.mean()) * np.linalg.norm(w), atol=1e-4)


def test_eigen_cam_runs_its_svds_on_one_blas_thread(monkeypatch):
    # threads only slow a [h*w, C] SVD down (OpenBLAS's threads wait busily for each other), so
    # EigenCAM limits BLAS to one thread however many the process allows
    import threadpoolctl

    svd = np.linalg.svd
    seen = []

    def recording_svd(*args, **kwargs):
        seen.append(max(info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"))
        return svd(*args, **kwargs)

    monkeypatch.setattr(np.linalg, "svd", recording_svd)
    a = np.random.default_rng(0).random((3, 8, 4, 4))
    with threadpoolctl.threadpool_limits(limits=4, user_api="blas"):
        before = max(info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas")
        eigen_cam(a)
    assert before == 4, f"the test could not allow 4 BLAS threads ({before})"
    assert seen == [1, 1, 1], f"EigenCAM's SVDs ran on {seen} BLAS threads, not one each"


def test_score_cam_masks_are_the_channels_upsampled_and_scaled():
    # the masks Score-CAM scores: each channel upsampled (bilinear, corners aligned) and min-max
    # scaled, written out as the interpolation formula on a 3 x 2 map upsampled to 5 x 4
    class Recorder:
        def __init__(self):
            self.batches = []

        def logits(self, batch):
            self.batches.append(batch)
            return np.zeros((len(batch), 2), np.float32)

    a = np.random.default_rng(1).random((1, 2, 3, 2))
    model = Recorder()
    images = np.ones((1, 3, 5, 4), np.float32)
    perturbation.score_cam(model, images, np.zeros(1, np.int64), a, np.zeros(1, np.int64), mask_batch=2)
    masks = np.concatenate(model.batches)[:, 0]
    ys, xs = np.arange(5) * (3 - 1) / (5 - 1), np.arange(4) * (2 - 1) / (4 - 1)
    for c in range(2):
        up = np.empty((5, 4))
        for r, y in enumerate(ys):
            for k, x in enumerate(xs):
                y0, x0 = min(int(y), 1), min(int(x), 0)
                fy, fx = y - y0, x - x0
                up[r, k] = ((1 - fy) * (1 - fx) * a[0, c, y0, x0] + (1 - fy) * fx * a[0, c, y0, x0 + 1]
                            + fy * (1 - fx) * a[0, c, y0 + 1, x0] + fy * fx * a[0, c, y0 + 1, x0 + 1])
        expected = (up - up.min()) / (up.max() - up.min() + 1e-8)
        np.testing.assert_allclose(masks[c], expected, rtol=1e-6, atol=1e-7, err_msg=f"channel {c}")


@pytest.mark.parametrize("settings, message", [
    ({"window": 40}, "occlusion window 40 is larger than the model's input 32x32"),
    ({"window": 4, "stride": 5}, "stride 5 is larger than the window 4"),
])
def test_bad_occlusion_settings(linear_model, batch, settings, message):
    with pytest.raises(ValueError, match=message):
        attribute(linear_model, MethodSpec("occlusion", **settings), *batch)


@pytest.mark.parametrize("settings, message", [
    ({"masks": 0}, "rise setting 'masks' must be an integer >= 1, got 0"),
    ({"probability": 1.5}, r"rise setting 'probability' must be a number in \[0, 1\], got 1.5"),
    ({"mask_batch": -1}, "rise setting 'mask_batch' must be an integer >= 0, got -1"),
    ({"grid": 0}, "rise setting 'grid' must be an integer >= 1, got 0"),
])
def test_bad_settings_are_refused_by_the_table(settings, message):
    with pytest.raises(contract.MethodSettingError, match=message):
        MethodSpec.from_request("rise", settings)


@pytest.mark.parametrize("settings, message", [
    ({"probability": 0}, r"probability must be in \(0, 1\]"),
    ({"grid": 33}, "RISE grid 33 must be between 1 and the model's input size 32"),
])
def test_bad_rise_settings_for_the_model(linear_model, batch, settings, message):
    with pytest.raises(ValueError, match=message):
        attribute(linear_model, MethodSpec("rise", masks=2, **settings), *batch)


def test_cam_methods_need_a_feature_map(linear_model, batch):
    for name in CAMS:
        with pytest.raises(UnsupportedMethodError, match="export it with --cam-layer auto"):
            attribute(linear_model, MethodSpec(name), *batch)
    with pytest.raises(ValueError, match=r"must be a feature map \[N, C, h, w\], got shape \[2, 5\]"):
        eigen_cam(np.zeros((2, 5)))


def test_masks_per_run():
    assert perturbation.masks_per_run(5, (3, 224, 224), 100) == 5
    assert perturbation.masks_per_run(500, (3, 224, 224), 100) == 100
    # automatic: 512 MiB over 16 input-sized tensors of 3 x 224 x 224 float32 per copy
    assert perturbation.masks_per_run(0, (3, 224, 224), 4000) == 512 * 2**20 // (16 * 4 * 3 * 224 * 224)
    assert perturbation.masks_per_run(0, (3, 32, 32), 4000) == 256


def test_progress_is_reported(linear_model, batch):
    seen = []
    token = perturbation.progress.set(lambda what, done, total: seen.append((what, done, total)))
    try:
        attribute(linear_model, MethodSpec("rise", masks=10, grid=2, mask_batch=4), *batch)
    finally:
        perturbation.progress.reset(token)
    assert [s[1] for s in seen] == [4, 8, 12, 16, 18, 20] and {s[2] for s in seen} == {20}, seen


def test_forward_methods_from_the_cli(tmp_path, photo_files):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(out), "--method",
                                       "occlusion", "--window", "8", "--stride", "4", "--format", "npy", "--json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["images"][0]["maps"][0]["files"]
    assert np.load(files["attribution"]).shape == (3, 32, 32)
    result = CliRunner().invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(out), "--method",
                                       "rise", "--masks", "20", "--grid", "4", "--format", "npy", "--json"])
    assert result.exit_code == 0, result.output
    assert np.load(json.loads(result.stdout)["images"][0]["maps"][0]["files"]["cam"]).shape == (1, 32, 32)
    result = CliRunner().invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(out), "--method",
                                       "occlusion", "--window", "33"])
    assert result.exit_code == 2 and "occlusion window 33 is larger than the model's input 32x32" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["run", str(LINEAR_MODEL), str(photo_files[0]), "--out", str(out), "--method",
                                       "rise", "--masks", "0"])
    assert result.exit_code == 2 and "Invalid value for '--masks': 0 is not in the range x>=1" in result.output


def test_info_lists_the_forward_methods():
    result = CliRunner().invoke(main, ["info", str(LINEAR_MODEL), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    text = json.dumps(doc)
    assert '"occlusion"' in text and '"rise"' in text


@pytest.fixture(scope="module")
def demo_model():
    from gradmap.demo import demo_assets

    model = demo_assets().joinpath("shapes.onnx")
    if not model.is_file():
        pytest.skip("demo model not generated (python models/make_demo.py)")
    return model, demo_assets().joinpath("images", "star_0.png")


@pytest.mark.parametrize("method", CAMS)
def test_cam_family_from_the_cli(tmp_path, demo_model, method):
    model, picture = demo_model
    result = CliRunner().invoke(main, ["run", str(model), str(picture), "--out", str(tmp_path), "--method", method,
                                       "--json", "--format", "npy"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["images"][0]["maps"][0]["files"]
    cam = np.load(files["cam"])
    assert cam.shape == (1, 64, 64) and cam.min() >= 0 and cam.max() > 0


def test_the_forward_part_is_cut_out_of_the_file(demo_model):
    """Masked copies run the forward part alone: the cut session reads only the picture and writes only the
    logits, equal to the whole graph's up to float32 rounding; the other outputs are gone from it."""
    from gradmap.runtime import SaliencyModel
    from gradmap.runtime._onnx_header import ProtobufError
    from gradmap.runtime._onnx_prune import prune_to_outputs

    model = SaliencyModel(demo_model[0], provider="cpu", threads=1)
    images = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    logits = model.logits(images)
    assert model._forward is not model.session
    assert [t.name for t in model._forward.get_inputs()] == ["image"]
    assert [t.name for t in model._forward.get_outputs()] == ["logits"]
    full = model.run_outputs(images, None, ("logits",))["logits"]
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    data = demo_model[0].read_bytes()
    cut = prune_to_outputs(data, ("logits",))
    assert len(cut) < len(data)
    with pytest.raises(ProtobufError, match="no output attention"):
        prune_to_outputs(data, ("attention",))
    with pytest.raises(ProtobufError):
        prune_to_outputs(b"\xff\xff\xff", ("logits",))


@pytest.mark.parametrize("method", ["occlusion", "rise"])
def test_perturbation_methods_never_run_the_whole_graph(demo_model, method, monkeypatch):
    """Occlusion and RISE find each picture's top-1 class from the forward part too: a full export's
    gradient is never computed for them; given targets are kept and checked."""
    from gradmap.runtime import SaliencyModel
    from gradmap.runtime.methods import MethodSpec, attribute

    model = SaliencyModel(demo_model[0], provider="cpu", threads=1)
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    spec = MethodSpec(method, **({"window": 32, "stride": 32} if method == "occlusion" else {"masks": 8}))
    expected = model.run(images).target_index
    whole = model.session.run
    calls = []
    monkeypatch.setattr(model.session, "run", lambda *a, **k: calls.append(a) or whole(*a, **k))
    _, found, _, _ = attribute(model, spec, images, None)
    assert calls == [] and model._forward is not model.session
    np.testing.assert_array_equal(found, expected)
    assert list(attribute(model, spec, images, np.array([3, -1]))[1]) == [3, expected[1]]
    with pytest.raises(ValueError, match="class indices below"):
        attribute(model, spec, images, np.array([99, 0]))


def test_a_graph_with_subgraphs_is_not_cut():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from gradmap.runtime._onnx_header import ProtobufError
    from gradmap.runtime._onnx_prune import prune_to_outputs

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["logits"], then_branch=branch, else_branch=branch)],
                              "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                    helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])])
    with pytest.raises(ProtobufError, match="subgraphs"):
        prune_to_outputs(helper.make_model(graph).SerializeToString(), ("logits",))


def test_gradmap_run_shows_the_progress_of_long_calls(capsys):
    from gradmap.cli import _MaskProgress

    now = [0.0]
    report = _MaskProgress()
    report.clock = lambda: now[0]
    for done, at in ((10, 1.0), (20, 4.0), (30, 6.0), (40, 8.0), (50, 11.5), (60, 12.0)):
        now[0] = at
        report("RISE masks", done, 60)
    # the clock starts at the first report: nothing in its first 5 s, then a line at most every 5 s, and the last
    assert capsys.readouterr().err.splitlines() == ["RISE masks: 30/60 (5 s)", "RISE masks: 50/60 (10 s)",
                                                    "RISE masks: 60/60 (11 s)"]


def test_gradmap_evaluate_runs_the_new_methods(demo_model, tmp_path):
    from gradmap.demo import demo_assets

    data = demo_assets().joinpath("eval_set.npz")
    if not data.is_file():
        pytest.skip("demo evaluation set not generated")
    out = tmp_path / "quality.json"
    result = CliRunner().invoke(main, ["evaluate", str(demo_model[0]), "--data", str(data), "--limit", "2",
                                       "--method", "layer-cam", "--method", "rise", "--masks", "20",
                                       "--method", "occlusion", "--window", "16", "--stride", "16",
                                       "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    methods = json.loads(out.read_text())["methods"]
    assert set(methods) == {"layer-cam", "rise", "occlusion"}
    for name, m in methods.items():
        assert 0 <= m["deletion_auc"]["mean"] <= 1 and 0 <= m["insertion_auc"]["mean"] <= 1, name


@pytest.mark.parametrize("method", ["attention-rollout", "score-cam"])
def test_forward_reading_methods_never_run_the_whole_graph(method, monkeypatch):
    """Attention rollout and Score-CAM read forward values (the attention probabilities, the CAM
    layer's activations): on a full export (the demo ViT: gradient, CAM layer and attention) they run
    the forward part alone, with the same maps and targets as the whole graph gives."""
    from pathlib import Path

    from gradmap.runtime import SaliencyModel
    from gradmap.runtime.methods import MethodSpec, attribute

    path = Path(__file__).resolve().parents[1] / "models" / "demo_vit" / "shapes_vit.onnx"
    model = SaliencyModel(path, provider="cpu", threads=1)
    images = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    spec = MethodSpec(method)
    reference = SaliencyModel(path, provider="cpu", threads=1)
    reference.forward_outputs = lambda images, targets, outputs: reference.run_outputs(  # the whole graph
        images, targets, (contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, *outputs))
    expected_maps, expected_targets, expected_logits, _ = attribute(reference, spec, images, np.array([2, -1, -1]))
    whole = model.session.run
    calls = []
    monkeypatch.setattr(model.session, "run", lambda *a, **k: calls.append(a) or whole(*a, **k))
    maps, targets, logits, _ = attribute(model, spec, images, np.array([2, -1, -1]))
    assert calls == [], "the whole graph ran"
    np.testing.assert_array_equal(targets, expected_targets)
    assert targets[0] == 2
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(maps, expected_maps, rtol=0, atol=1e-5 * np.abs(expected_maps).max())
    with pytest.raises(ValueError, match="class indices below"):
        attribute(model, spec, images, np.array([99, 0, 0]))
    with pytest.raises(ValueError, match="not an output of the forward pass"):
        model.forward_outputs(images, None, (contract.OUTPUT_GRADIENT,))
