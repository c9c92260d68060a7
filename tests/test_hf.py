"""Hugging Face Transformers classifiers: `gradmap export hf:DIR` of models built from small configs with
random weights (saved with save_pretrained, offline), preprocessing equal to the image processor's
PIL backend, labels from id2label."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import PHOTO_NAMES, assert_close
from test_timm import require

torch = require("torch")
transformers = require("transformers")
onnx = require("onnx")
from click.testing import CliRunner  # noqa: E402

from gradmap.cli import main  # noqa: E402
from gradmap.contract import ModelMetadata  # noqa: E402
from gradmap.export import ExportError  # noqa: E402
from gradmap.export._hf import hf_preprocessing, load_hf  # noqa: E402
from gradmap.runtime import preprocess  # noqa: E402


def _save(tmp_path, config, processor, seed=0):
    config.id2label = {i: f"class {i}" for i in range(config.num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageClassification.from_config(config).eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return model


# Each architecture with its own image processor: height/width resize (ViT), shortest edge + crop_pct
# (ConvNeXT's), shortest edge + center crop (DINOv2's BitImageProcessor, bicubic), MobileViT's channel
# flip without normalization
MODELS = {
    "vit": lambda: (transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, image_size=32, patch_size=8, num_labels=5),
                    transformers.ViTImageProcessor(size={"height": 32, "width": 32})),
    "convnext": lambda: (transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=4),
                         transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)),
    "dinov2": lambda: (transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, image_size=56, patch_size=14, num_labels=3),
                       transformers.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                                      resample=3, image_mean=[0.485, 0.456, 0.406],
                                                      image_std=[0.229, 0.224, 0.225])),
    "mobilevit": lambda: (transformers.MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32],
                                                       neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_labels=3),
                          transformers.MobileViTImageProcessor(size={"shortest_edge": 72},
                                                               crop_size={"height": 64, "width": 64})),
}


def _pil_processor(directory):
    return transformers.AutoImageProcessor.from_pretrained(directory, backend="pil")


@pytest.mark.parametrize("arch", ["vit", "convnext", "dinov2"])
def test_cli_export_from_a_directory(arch, tmp_path):
    config, processor = MODELS[arch]()
    model = _save(tmp_path, config, processor)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", f"hf:{tmp_path}", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "parity with torch" in result.output
    meta = ModelMetadata.from_props({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    assert meta.labels == tuple(f"class {i}" for i in range(config.num_labels))
    assert meta.source_model == f"hf:{tmp_path}" and meta.weights.startswith("hf pretrained")
    # the saved weights, not fresh random ones: logits equal the saved model's
    import onnxruntime as ort

    image = np.random.default_rng(1).standard_normal((1, 3, *meta.preprocessing.crop), dtype=np.float32)
    (logits,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": image, "target": np.array([-1])})
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(image)).logits.numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", PHOTO_NAMES)
@pytest.mark.parametrize("arch", list(MODELS))
def test_preprocessing_matches_the_image_processor(arch, name, photos, tmp_path):
    config, processor = MODELS[arch]()
    processor.save_pretrained(tmp_path)
    picture = Image.fromarray(photos[name]).convert("RGB")
    expected = _pil_processor(tmp_path)(picture, return_tensors="np")["pixel_values"][0]
    processor_dict = transformers.ImageProcessingMixin.get_image_processor_dict(str(tmp_path))[0]
    tensor, _ = preprocess(picture, hf_preprocessing(processor_dict))
    if processor_dict.get("do_flip_channel_order"):
        tensor = tensor[::-1]  # the exported graph flips channels before the model (see the next test)
    assert_close(tensor, expected, 1e-6, f"{arch} preprocessing of {name}")


def test_channel_flip_is_part_of_the_exported_graph(tmp_path):
    """MobileViT's processor gives BGR pixels: the graph takes RGB and flips them itself."""
    config, processor = MODELS["mobilevit"]()
    model = _save(tmp_path, config, processor)
    module, _, _, _ = load_hf(str(tmp_path), "pretrained")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), model(pixel_values=x.flip(1)).logits.numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_random_weights_and_errors(tmp_path):
    config, processor = MODELS["vit"]()
    _save(tmp_path, config, processor, seed=1)
    module, weights, _, _ = load_hf(str(tmp_path), "none", seed=3)
    assert weights == "none (random, seed 3)"
    with pytest.raises(ExportError, match="cannot read a Transformers config"):
        load_hf(str(tmp_path / "nowhere"), "none")
    (tmp_path / "plain").mkdir()
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(tmp_path / "plain")
    processor.save_pretrained(tmp_path / "plain")
    with pytest.raises(ExportError, match="'bert' is not an image classifier"):
        load_hf(str(tmp_path / "plain"), "none")


def test_hub_id_loads_through_the_hugging_face_cache(tmp_path, monkeypatch):
    """hf:ORG/NAME with the files where the hub cache keeps them, offline."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--gradmap-test--tiny-vit"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = repo / "snapshots" / commit
    config, processor = MODELS["vit"]()
    model = _save(snapshot, config, processor, seed=4)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    module, weights, _, _ = load_hf("gradmap-test/tiny-vit", "pretrained")
    assert weights == "hf pretrained gradmap-test/tiny-vit"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), model(pixel_values=x).logits.numpy(), rtol=1e-6, atol=1e-6)


def _pp_lcnet():
    blocks = [[[3, 8, 16, 1, False]], [[3, 16, 16, 2, False]], [[3, 16, 32, 2, False]], [[3, 32, 32, 2, False]],
              [[5, 32, 32, 2, True]]]
    return (transformers.PPLCNetConfig(block_configs=blocks, stem_channels=8, class_expand=32, num_labels=4),
            transformers.PPLCNetImageProcessor(resize_short=72, crop_size={"height": 64, "width": 64}))


def test_pp_lcnet_scores_bgr_input_and_short_side_resize(tmp_path):
    """PP-LCNet's classifier returns its scores as last_hidden_state and its processor always hands
    it BGR pixels, after resizing the shorter side to resize_short (no PIL backend exists for it)."""
    config, processor = _pp_lcnet()
    model = _save(tmp_path, config, processor)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", f"hf:{tmp_path}", "-o", str(out)])
    assert result.exit_code == 0, result.output
    meta = ModelMetadata.from_props({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    assert (meta.preprocessing.resize, meta.preprocessing.resize_mode) == ((72, 72), "keep_ratio")
    import onnxruntime as ort

    image = np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32)
    (logits,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": image, "target": np.array([-1, -1])})
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(image).flip(1)).last_hidden_state.numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_pp_lcnet_preprocessing_matches_its_processor(name, photos, tmp_path):
    """Same geometry and normalization as PP-LCNet's processor; its torchvision resize rounds a few
    pixels one 8-bit level away from PIL's (measured on the four photographs: 0.07-0.14 % of the values)."""
    _, processor = _pp_lcnet()
    processor.save_pretrained(tmp_path)
    picture = Image.fromarray(photos[name]).convert("RGB")
    expected = transformers.AutoImageProcessor.from_pretrained(tmp_path)(picture, return_tensors="np")["pixel_values"][0]
    processor_dict = transformers.ImageProcessingMixin.get_image_processor_dict(str(tmp_path))[0]
    pre = hf_preprocessing(processor_dict)
    tensor, _ = preprocess(picture, pre)
    tensor = tensor[::-1]  # the exported graph flips to BGR itself
    levels = np.abs(tensor - expected) * 255 * np.asarray(pre.std[::-1], dtype=np.float32)[:, None, None]
    assert levels.max() <= 1 + 1e-3, f"{name}: {levels.max():.3f} levels"
    assert np.mean(levels > 0.5) < 5e-3, f"{name}: {np.mean(levels > 0.5):.2%} of the values differ"
