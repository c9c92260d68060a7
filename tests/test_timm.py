"""timm models: preprocessing equal to timm's eval transform, `gradmap export timm:NAME` with random
weights and weight files, labels, errors; and a representative subset of families against torch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import PHOTO_NAMES, assert_close


def require(module: str):
    """Import an optional stack: skipped when absent, but a failure in CI (which installs it)."""
    try:
        return pytest.importorskip(module)
    except pytest.skip.Exception:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is missing in CI: .ci/run installs it through the [timm] and [hf] extras")
        raise


torch = require("torch")
timm = require("timm")
onnx = require("onnx")
from click.testing import CliRunner  # noqa: E402

from gradmap.cli import main  # noqa: E402
from gradmap.contract import ModelMetadata, Preprocessing  # noqa: E402
from gradmap.export import ExportError  # noqa: E402
from gradmap.export._timm import export_timm, load_timm, preprocessing_from_config, timm_preprocessing  # noqa: E402
from gradmap.runtime import preprocess  # noqa: E402

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# timm data configs covering each crop mode, both interpolations timm's pretrained configs use, crop_pct
# below and at 1, and non-square inputs (center -> ResizeKeepRatio, squash, border with its fill)
CONFIGS = {
    "center-bicubic-0.875": dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875,
                                 crop_mode="center", **IMAGENET),
    "center-bilinear-0.95": dict(input_size=(3, 288, 288), interpolation="bilinear", crop_pct=0.95,
                                 crop_mode="center", **INCEPTION),
    "center-bicubic-1.0": dict(input_size=(3, 256, 256), interpolation="bicubic", crop_pct=1.0,
                               crop_mode="center", **IMAGENET),
    "center-non-square": dict(input_size=(3, 192, 256), interpolation="bicubic", crop_pct=0.9,
                              crop_mode="center", **IMAGENET),
    "squash-non-square": dict(input_size=(3, 256, 192), interpolation="bicubic", crop_pct=0.9,
                              crop_mode="squash", **IMAGENET),
    "squash-1.0": dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0, crop_mode="squash",
                       **INCEPTION),
    "border-0.95": dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.95, crop_mode="border",
                        **IMAGENET),
    "border-non-square": dict(input_size=(3, 160, 256), interpolation="bilinear", crop_pct=1.0,
                              crop_mode="border", **INCEPTION),
}


@pytest.mark.parametrize("name", PHOTO_NAMES)
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_preprocessing_matches_timm_eval_transform(photos, config, name):
    from timm.data import create_transform

    cfg = CONFIGS[config]
    picture = Image.fromarray(photos[name]).convert("RGB")
    expected = create_transform(**cfg, is_training=False)(picture).numpy()
    tensor, geometry = preprocess(picture, preprocessing_from_config(cfg))
    assert_close(tensor, expected, 1e-6, f"{config} on {name}")
    assert geometry.crop_size == tuple(cfg["input_size"][1:])


def test_preprocessing_of_a_pretrained_config_and_its_metadata():
    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    p = timm_preprocessing(module)
    assert p == Preprocessing(crop=(224, 224), resize=256, interpolation="bicubic", **INCEPTION)
    squash = Preprocessing(crop=(256, 192), resize=(284, 213), resize_mode="exact", interpolation="bicubic")
    assert preprocessing_from_config(CONFIGS["squash-non-square"]) == squash
    # new fields are written only when used, and read back exactly
    assert "resize_mode" not in p.to_dict() and "crop_rounding" not in p.to_dict()
    border = preprocessing_from_config(CONFIGS["border-0.95"])
    assert border.pad_fill == (124, 116, 104) and Preprocessing.from_dict(border.to_dict()) == border
    assert Preprocessing.from_dict(json.loads(json.dumps(squash.to_dict()))) == squash


def test_cli_export_timm_model_with_labels_and_preprocessing(tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", "timm:test_efficientnet_gn", "--weights", "none", "-o", str(out)])
    assert result.exit_code == 0, result.output
    meta = ModelMetadata.from_props({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    assert meta.source_model == "timm:test_efficientnet_gn"
    assert meta.labels[0] == "tench, Tinca tinca" and meta.num_classes == 1000
    module = timm.create_model("test_efficientnet_gn")
    assert meta.preprocessing == timm_preprocessing(module)
    assert "parity with torch" in result.output


def test_weights_files_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    source = timm.create_model("test_resnet", num_classes=1000).eval()
    state = source.state_dict()
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    image = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 160, 160), dtype=np.float32))
    with torch.no_grad():
        expected = source(image).numpy()
    import onnxruntime as ort

    for weights in ("w.pth", "w.safetensors"):
        out = tmp_path / f"{weights}.onnx"
        report = export_timm("test_resnet", out, weights=str(tmp_path / weights))
        assert report.weights == f"file:{weights}"
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"image": image.numpy(), "target": np.array([-1])})
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                                   err_msg=f"{weights}: logits differ from the source model")


def test_bad_names_and_weights_are_refused_clearly(tmp_path):
    with pytest.raises(ExportError, match=r"unknown timm model 'resnet5O'.*resnet50"):
        load_timm("resnet5O", "none")
    with pytest.raises(ExportError, match="unknown timm pretrained tag 'resnet18.no_such_tag'"):
        load_timm("resnet18.no_such_tag", "none")
    with pytest.raises(ExportError, match="does not exist"):
        load_timm("test_resnet", str(tmp_path / "missing.safetensors"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ExportError, match="does not fit timm's test_resnet"):
        load_timm("test_resnet", str(wrong))


def _offline_hub(monkeypatch, cache):
    """Hugging Face hub access offline, with ``cache`` as its cache (its constants are read at import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def test_pretrained_without_network_says_how_to_proceed(tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path / "empty-cache")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    result = CliRunner().invoke(main, ["export", "timm:test_resnet.r160_in1k", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1, result.output
    assert "--weights PATH" in result.output and "--weights none" in result.output, result.output
    assert not (tmp_path / "x.onnx").exists()


def test_pretrained_weights_load_through_timms_hub_cache(tmp_path, monkeypatch):
    """The real pretrained code path: timm's loader finds the file where the hub cache keeps it."""
    from safetensors.torch import save_file

    hub_id = timm.models.get_pretrained_cfg("test_resnet.r160_in1k").hf_hub_id
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    torch.manual_seed(11)
    source = timm.create_model("test_resnet", num_classes=1000).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))
    _offline_hub(monkeypatch, tmp_path / "hub")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", "timm:test_resnet.r160_in1k", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "weights timm pretrained test_resnet.r160_in1k" in result.output, result.output
    import onnxruntime as ort

    image = np.random.default_rng(2).standard_normal((1, 3, 160, 160), dtype=np.float32)
    (logits,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": image, "target": np.array([-1])})
    with torch.no_grad():
        expected = source(torch.from_numpy(image)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_attention_blocks_take_the_explicit_path():
    """timm's fused attention (F.scaled_dot_product_attention) is turned off at load: torch.onnx
    exports it for 4-D queries only (hiera's are 5-D); the explicit path is the same math."""
    module, _ = load_timm("test_vit", "none", img_size=(64, 64))
    blocks = [m for m in module.modules() if hasattr(m, "fused_attn")]
    assert blocks and not any(m.fused_attn for m in blocks)


# A representative subset of the families in README's coverage table (tools/timm_coverage.py):
# convolutional, squeeze-excitation with GroupNorm, ViT attention, MaxViT windows, MetaFormer pooling
# (InstanceNormalization, the op the gradient pass lacked), at small inputs.
SUBSET = {"test_convnext": None, "test_vit": (64, 64), "test_maxvit": (64, 64), "poolformer_s12": (64, 64)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SUBSET))
def test_family_subset_matches_torch_autograd(name, tmp_path):
    """The export's own parity check (float64 autograd on random batches, decisions replayed) passes
    and its figures are reported; a model over the tolerance would not have been written."""
    report = export_timm(name, tmp_path / "m.onnx", weights="none", input_size=SUBSET[name])
    assert report.path is not None and report.path.exists()
    assert report.logits_error <= 1e-4 and report.gradient_error <= 1e-4, (name, report.logits_error,
                                                                            report.gradient_error)
    proto = onnx.load(str(report.path))
    crop = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props}).preprocessing.crop
    assert crop == (SUBSET[name] or (160, 160)), crop
    assert report.backward_nodes > 0
