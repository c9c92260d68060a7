"""``--cam-layer auto`` where the map a transformer-style classifier pools is not a plain module's
[N, C, H, W] output: a final map of one cell (EfficientViT-MSRA at 64x64), a map permuted after its
norm (NesT), a map flattened before its mean (Transformers' SwiftFormer), and Hiera's token maps,
whose order only the last stage has on the patch grid. Small models with random weights, against
float64 torch hooks on the module auto names, the models' own spatial re-ordering (Hiera) and
pytorch-grad-cam."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from test_timm import require
from test_vit_methods import (_CAM_NAMES, SIZE, TOLERANCE, _export, _hooked, _image, _run, _scale_cam_image,
                              _tap, _tokens_to_grid, rel)

torch = require("torch")
timm = require("timm")

from gradmap import contract  # noqa: E402
from gradmap.runtime.cam import grad_cam  # noqa: E402


def _cam_layer(path) -> str:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return contract.ModelMetadata.from_props(props).cam_layer


def _timm(name, img_size=SIZE, **kwargs):
    """A timm model as gradmap export timm:NAME --weights none builds it: attention unfused,
    zero-initialized layers (a head) drawn from N(0, 0.02); ``img_size=None``: built for its default
    size (then exported at 64x64, as ``--crop 64`` does)."""
    from gradmap.export._timm import _explicit_attention
    from gradmap.export._torchvision import _fill_zero_weights

    torch.manual_seed(0)
    size = {"img_size": img_size} if img_size is not None else {}
    module = _explicit_attention(timm.create_model(name, pretrained=False, num_classes=10, **size, **kwargs))
    _fill_zero_weights(module)
    return module.eval()


def _hf(config_class, **fields):
    transformers = require("transformers")
    from gradmap.export._hf import _Classifier

    config = getattr(transformers, config_class)(num_labels=5, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(config, attn_implementation="eager")
    model.config.return_dict = True
    return _Classifier(model.eval(), flip_channels=False).eval()


def _checked(build, path, layer_of, reshape, targets=(-1, 3)):
    """cam_activation and cam_gradient of the exported file against float64 torch hooked on
    ``layer_of(module)`` through ``reshape``, and Grad-CAM against pytorch-grad-cam's with that
    reshape_transform; returns the file's outputs and the torch module."""
    pgc = require("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    image = _image()
    out = _run(path, image, np.array(targets, dtype=np.int64), _CAM_NAMES)
    module = build()
    layer = layer_of(module)
    activation, gradient, logits = _hooked(module, layer, reshape, image, out[contract.OUTPUT_TARGET_INDEX])
    assert rel(out[contract.OUTPUT_LOGITS], logits, "logits") <= TOLERANCE
    assert rel(out[contract.OUTPUT_CAM_ACTIVATION], activation, "cam_activation") <= TOLERANCE
    assert rel(out[contract.OUTPUT_CAM_GRADIENT], gradient, "cam_gradient") <= TOLERANCE
    cam_activation = out[contract.OUTPUT_CAM_ACTIVATION]
    cam = pgc.GradCAM(model=module, target_layers=[layer], reshape_transform=reshape)
    cam.get_target_width_height = lambda input_tensor: (cam_activation.shape[3], cam_activation.shape[2])
    try:
        expected = cam(input_tensor=torch.from_numpy(image).double(),
                       targets=[ClassifierOutputTarget(int(t)) for t in out[contract.OUTPUT_TARGET_INDEX]])
    finally:
        cam.activations_and_grads.release()
    ours = _scale_cam_image(_scale_cam_image(grad_cam(cam_activation, out[contract.OUTPUT_CAM_GRADIENT])))
    assert float(np.abs(ours - expected).max()) <= 1e-4
    return out, module


# -- a final map of one cell -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_final_map_of_one_cell_is_the_map_the_classifier_pools_with_a_warning(tmp_path, caplog):
    """EfficientViT-MSRA at 64x64 ends on a 1x1 map. auto takes it (the last stage's output, the layer a
    pytorch-grad-cam user hooks: model.stages[-1]) and warns that every CAM map of it is constant, naming
    larger layers; it used to pass the final pooling by and take a squeeze-excitation block's input in
    stage 1, the output of a ReLU module called twice."""
    build = lambda: _timm("efficientvit_m0", img_size=None)  # noqa: E731  (as gradmap export ... --crop 64)
    path = tmp_path / "efficientvit.onnx"
    with caplog.at_level(logging.WARNING, logger="gradmap.graph.gradient._layers"):
        _export(build(), path, cam_layer="auto", verify=False)
    warned = [r.getMessage() for r in caplog.records if "one cell" in r.getMessage()]
    assert warned and "64x64 input" in warned[0] and "--cam-layer stages.2." in warned[0], warned
    assert "patchmerge.act" not in warned[0], f"a module called twice is no layer to suggest: {warned[0]}"
    # the maps before the stride that made the one cell, not the last blocks' attention windows (padded)
    assert "--cam-layer stages.2.blocks" not in warned[0], warned[0]
    cam_layer = _cam_layer(path)
    assert cam_layer.startswith("auto (stages.2.blocks.2.ffn1: ") and "one cell" in cam_layer, cam_layer
    out, _ = _checked(build, path, lambda m: m.stages[-1], None)
    assert out[contract.OUTPUT_CAM_ACTIVATION].shape == (2, 192, 1, 1)


class _PooledTwice(torch.nn.Module):
    """A CNN whose head pools the pooled vector again ([N, C, 1, 1] -> mean over H, W): that vector is
    no map of one cell; the map is the convolution's."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.mix = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        pooled = self.mix(self.pool(self.act(self.conv(x))))
        return self.fc(pooled.mean(dim=(2, 3)))


@pytest.mark.slow
def test_a_pooled_vector_pooled_again_is_no_map_of_one_cell(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "twice.onnx"
    _export(_PooledTwice().eval(), path, cam_layer="auto", verify=False)
    assert _cam_layer(path).startswith("auto (act: "), _cam_layer(path)
    torch.manual_seed(0)
    build = lambda: _PooledTwice().eval()  # noqa: E731
    torch.manual_seed(0)
    out, _ = _checked(build, path, lambda m: m.act, None)
    assert out[contract.OUTPUT_CAM_ACTIVATION].shape[2:] == (SIZE // 2, SIZE // 2)


# -- maps that are no module's output as pooled ----------------------------------------------------------


@pytest.mark.slow
def test_nests_pooled_map_is_its_norm_channels_last(tmp_path):
    """NesT pools ``norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)``: the permute is no module, so
    auto takes the norm's channels-last output (as pytorch-grad-cam's Swin recipe hooks it); it used to
    take the permute's value, which names no module to hook."""
    def build():
        from timm.models.nest import Nest

        from gradmap.export._timm import _explicit_attention

        torch.manual_seed(0)
        return _explicit_attention(Nest(img_size=SIZE, embed_dims=(32, 64, 96), num_heads=(1, 2, 3), depths=(1, 1, 1),
                                        num_classes=10)).eval()

    path = tmp_path / "nest.onnx"
    _export(build(), path, cam_layer="auto", verify=False)
    cam_layer = _cam_layer(path)
    assert cam_layer.startswith("auto (norm: ") and "channels last" in cam_layer, cam_layer
    out, _ = _checked(build, path, lambda m: m.norm, lambda t: t.permute(0, 3, 1, 2))
    assert out[contract.OUTPUT_CAM_ACTIVATION].shape == (2, 96, 4, 4)


@pytest.mark.slow
def test_swiftformers_flattened_mean_pools_its_norm(tmp_path):
    """Transformers' SwiftFormer pools ``norm(x).flatten(2).mean(-1)``: auto takes the norm's [N, C, H, W]
    output, as timm's SwiftFormer gives (it used to take a residual sum inside the last block, no
    module's output)."""
    build = lambda: _hf("SwiftFormerConfig", image_size=SIZE, depths=[1, 1, 1, 1],  # noqa: E731
                        embed_dims=[16, 16, 32, 32])
    path = tmp_path / "swiftformer.onnx"
    _export(build(), path, cam_layer="auto", verify=False)
    assert _cam_layer(path).startswith("auto (model.norm: "), _cam_layer(path)
    out, _ = _checked(build, path, lambda m: m.model.norm, None)
    assert out[contract.OUTPUT_CAM_ACTIVATION].shape == (2, 32, 2, 2)


# -- Hiera ---------------------------------------------------------------------------------------------


def _hf_hiera(depths):
    return lambda: _hf("HieraConfig", image_size=[SIZE, SIZE], embed_dim=16, depths=depths, num_heads=[1, 1, 1, 1])


def _rerolled(module, image):
    """Transformers' own spatial [N, H, W, C] view of the last stage's tokens (HieraEncoder.reroll), as
    [N, C, H, W], and the last stage's tokens as they are."""
    with torch.no_grad():
        hidden = module.model.hiera(torch.from_numpy(image).double(), output_hidden_states=True)
    return hidden.reshaped_hidden_states[-1].permute(0, 3, 1, 2).numpy(), hidden.hidden_states[-1]


def _vit_recipe(grid):
    def reshape(tensor):
        return tensor.reshape(tensor.size(0), grid, grid, tensor.size(2)).permute(0, 3, 1, 2)
    return reshape


@pytest.mark.slow
def test_hf_hieras_last_stage_output_when_its_only_block_pools(tmp_path):
    """One block per stage: the last attention pools the queries of stage 3's 4x4 map, whose tokens are
    still in Hiera's unrolled order, so its norm is no map on a grid. auto takes the last block's output
    (2x2 tokens, the map the classifier averages; it used to refuse): in the patch grid's row-major order,
    as Transformers' own reroll of the last stage shows, and checked against the hook and pytorch-grad-cam
    through the ViT recipe."""
    build = _hf_hiera([1, 1, 1, 1])
    path = tmp_path / "hiera.onnx"
    _export(build(), path, cam_layer="auto", verify=False)
    cam_layer = _cam_layer(path)
    assert cam_layer.startswith("auto (model.hiera.encoder.stages.3.layers.0: ") and "2x2 patch grid" in cam_layer, \
        cam_layer
    out, module = _checked(build, path, lambda m: _tap(m.model.hiera.encoder.stages[-1].layers, -1), _vit_recipe(2))
    spatial, _ = _rerolled(module, _image())
    assert rel(out[contract.OUTPUT_CAM_ACTIVATION], spatial, "Transformers' rerolled last stage") <= TOLERANCE


@pytest.mark.slow
def test_hf_hieras_last_blocks_norm_when_the_last_stage_has_two(tmp_path):
    """Two blocks in the last stage: auto takes the last block's layernorm_before, as on timm's Hiera
    (blocks[-1].norm1): Hiera's attention Softmax is over [N, heads, windows, queries, keys]. The last
    stage's tokens are on the grid row-major (Transformers' reroll of it is a plain reshape)."""
    build = _hf_hiera([1, 1, 1, 2])
    path = tmp_path / "hiera2.onnx"
    _export(build(), path, cam_layer="auto", verify=False)
    cam_layer = _cam_layer(path)
    assert cam_layer.startswith("auto (model.hiera.encoder.stages.3.layers.1.layernorm_before: ") \
        and "2x2 patch grid" in cam_layer, cam_layer
    _, module = _checked(build, path, lambda m: m.model.hiera.encoder.stages[-1].layers[-1].layernorm_before,
                         _vit_recipe(2))
    spatial, tokens = _rerolled(module, _image())
    assert np.array_equal(_vit_recipe(2)(tokens).numpy(), spatial), "the last stage's tokens are not row-major"


@pytest.mark.slow
def test_timm_hiera_whose_last_block_pools_takes_its_output(tmp_path):
    """timm's Hiera with one block per stage: the last block's norm1 reads stage 3's 16 tokens in the
    unrolled order (auto used to take it as a 4x4 grid, scrambled); auto takes the block's 2x2 output,
    which timm's own forward_intermediates rerolls to the same [N, C, 2, 2] map."""
    build = lambda: _timm("hiera_tiny_224", embed_dim=16, num_heads=1, stages=(1, 1, 1, 1))  # noqa: E731
    path = tmp_path / "hiera_timm.onnx"
    _export(build(), path, cam_layer="auto", verify=False)
    cam_layer = _cam_layer(path)
    assert cam_layer.startswith("auto (blocks.3: ") and "2x2 patch grid" in cam_layer, cam_layer
    out, module = _checked(build, path, lambda m: m.blocks[-1], _vit_recipe(2))
    with torch.no_grad():
        intermediates = module.forward_intermediates(torch.from_numpy(_image()).double(), indices=[3],
                                                     intermediates_only=True)
    assert rel(out[contract.OUTPUT_CAM_ACTIVATION], intermediates[-1].numpy(), "timm's rerolled blocks.3") <= TOLERANCE


@pytest.mark.slow
def test_class_attention_is_no_query_pooling(tmp_path):
    """CaiT's class attention has the class token's query alone ([N, heads, 1, 1 + h*w] scores), fewer
    queries than keys as in Hiera's pooling blocks, but it pools no patch tokens: auto keeps the last
    class-attention block's norm1, the token map with its class token."""
    build = lambda: _timm("cait_xxs24_224", depth=2, depth_token_only=1, embed_dim=32, num_heads=2)  # noqa: E731
    path = tmp_path / "cait.onnx"
    _export(build(), path, cam_layer="auto", verify=False)
    cam_layer = _cam_layer(path)
    assert cam_layer.startswith("auto (blocks_token_only.0.norm1: ") and "1 prefix token(s) + 4x4 patch grid" \
        in cam_layer, cam_layer
    _checked(build, path, lambda m: m.blocks_token_only[-1].norm1, _tokens_to_grid(1))
