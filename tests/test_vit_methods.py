"""Vision transformers: ``--cam-layer auto`` on token maps, against torch hooks and pytorch-grad-cam's
ViT recipe, on small timm, Transformers and torchvision ViTs with random weights."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from test_timm import require

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

torch = require("torch")
timm = require("timm")
onnxruntime = require("onnxruntime")

from gradmap import contract  # noqa: E402
from gradmap.contract import Preprocessing  # noqa: E402
from gradmap.export import ExportError, export_module  # noqa: E402
from gradmap.runtime.cam import grad_cam  # noqa: E402

import attention_reference  # noqa: E402  (bench/: the papers' rules, which bench_forward.py times too)

SIZE = 64
TOLERANCE = 1e-4  # max|Δ| / max|float64 torch|


def rel(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max()
    assert scale > 0, f"{what}: the reference is all zeros"
    return float(np.abs(actual - expected).max() / scale)


def _tokens_to_grid(prefix):
    """pytorch-grad-cam's ViT reshape_transform, with ``prefix`` class/distillation tokens dropped."""
    def reshape(tensor):
        patches = tensor[:, prefix:, :]
        side = int(round(patches.shape[1] ** 0.5))
        return patches.reshape(tensor.size(0), side, side, tensor.size(2)).permute(0, 3, 1, 2)
    return reshape


def _channels_last_to_grid(tensor):
    return tensor.permute(0, 3, 1, 2)


def _timm(name, **kwargs):
    def build():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=10, img_size=SIZE, **kwargs).eval()
    return build


def _hf_vit():
    transformers = require("transformers")
    from gradmap.export._hf import _Classifier

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=SIZE, patch_size=16, num_labels=5)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(config, attn_implementation="eager")  # as gradmap loads it
    model.config.return_dict = True
    return _Classifier(model.eval(), flip_channels=False).eval()


def _hf(config_class, **fields):
    """A small Transformers classifier with random weights, built as gradmap export hf: builds it."""
    def build():
        transformers = require("transformers")
        from gradmap.export._hf import _Classifier

        config = getattr(transformers, config_class)(image_size=SIZE, num_labels=5, **fields)
        torch.manual_seed(0)
        model = transformers.AutoModelForImageClassification.from_config(config, attn_implementation="eager")
        model.config.return_dict = True
        return _Classifier(model.eval(), flip_channels=False).eval()
    return build


_HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16)


def _swin_reshape_transform(height, width):
    """pytorch-grad-cam's documented Swin reshape_transform (its tutorial's, for a 7x7 final grid
    there), on this size's final grid: tokens or [N, h, w, C] -> [N, C, h, w]."""
    def reshape(tensor):
        result = tensor.reshape(tensor.size(0), height, width, tensor.size(-1))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape


class _Tapped(torch.nn.Module):
    """A module with an Identity on its output's tensor: a Transformers block returns a tuple, and
    hooks (pytorch-grad-cam's too) need a tensor."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.tap = inner, torch.nn.Identity()

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return (self.tap(out[0]), *out[1:]) if isinstance(out, tuple) else self.tap(out)


def _tap(blocks, index):
    """The tap on ``blocks[index]``'s output (installed once)."""
    if not isinstance(blocks[index], _Tapped):
        blocks[index] = _Tapped(blocks[index])
    return blocks[index].tap


def _torchvision_swin(version):
    """torchvision's SwinTransformer (swin_t's or swin_v2_t's blocks) at a small width, 64x64: a
    16x16 patch grid merged to 2x2 in the last stage."""
    def build():
        from torchvision.models import swin_transformer as swin

        from gradmap.export._torchvision import _fill_zero_weights

        v2 = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if version == 2 else {}
        torch.manual_seed(0)
        module = swin.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 4],
                                      window_size=[2, 2], num_classes=10, **v2).eval()
        _fill_zero_weights(module)
        return module
    return build


def _torchvision_vit():
    import torchvision

    from gradmap.export._torchvision import _fill_zero_weights

    torch.manual_seed(0)
    module = torchvision.models.vit_b_16(weights=None, image_size=SIZE, num_classes=10).eval()
    _fill_zero_weights(module)  # its head starts at zero, as gradmap export --weights none redraws it
    return module


# name -> (module builder, the layer pytorch-grad-cam's examples hook, its reshape_transform)
MODELS = {
    "timm-vit_tiny": (_timm("vit_tiny_patch16_224", depth=4), lambda m: m.blocks[-1].norm1, _tokens_to_grid(1)),
    "timm-vit_registers": (_timm("vit_tiny_patch16_224", depth=2, reg_tokens=4), lambda m: m.blocks[-1].norm1,
                           _tokens_to_grid(5)),
    "timm-deit_tiny_distilled": (_timm("deit_tiny_distilled_patch16_224", depth=2),
                                 lambda m: m.blocks[-1].norm1, _tokens_to_grid(2)),
    "timm-swin": (_timm("swin_tiny_patch4_window7_224", window_size=2, embed_dim=24, depths=(1, 1, 2, 1),
                        num_heads=(1, 2, 3, 4)),
                  lambda m: m.layers[-1].blocks[-1].norm1, _channels_last_to_grid),
    "torchvision-vit_b_16": (_torchvision_vit, lambda m: m.encoder.layers[-1].ln_1, _tokens_to_grid(1)),
    "hf-vit": (_hf_vit, lambda m: m.model.vit.layers[-1].layernorm_before, _tokens_to_grid(1)),
    # BEiT: relative position bias in every block, mean-pooled patch tokens
    "timm-beit": (_timm("beit_base_patch16_224", depth=2, embed_dim=64, num_heads=2),
                  lambda m: m.blocks[-1].norm1, _tokens_to_grid(1)),
    "hf-beit": (_hf("BeitConfig", use_relative_position_bias=True, **_HF_SMALL),
                lambda m: m.model.beit.layers[-1].layernorm_before, _tokens_to_grid(1)),
    "hf-dinov2_registers": (_hf("Dinov2WithRegistersConfig", num_register_tokens=4, **_HF_SMALL),
                            lambda m: m.model.dinov2_with_registers.encoder.layer[-1].norm1, _tokens_to_grid(5)),
    # Swin V2 normalizes after its attention (post-norm): auto takes the residual stream entering the
    # last block, the previous block's output ([N, h, w, C] in timm, tokens in Transformers)
    "timm-swinv2": (_timm("swinv2_tiny_window8_256", window_size=2, embed_dim=24, depths=(1, 1, 1, 2),
                          num_heads=(1, 2, 3, 4)),
                    lambda m: m.layers[-1].blocks[-2], _channels_last_to_grid),
    "hf-swinv2": (_hf("Swinv2Config", embed_dim=16, depths=[1, 1, 1, 2], num_heads=[1, 1, 2, 2], window_size=2,
                      patch_size=4),
                  lambda m: _tap(m.model.swinv2.encoder.layers[-1].blocks, -2), _swin_reshape_transform(2, 2)),
    # torchvision's Swin pools its final norm's map (permuted to [N, C, h, w]): auto takes it, as a CNN's
    "torchvision-swin_t": (_torchvision_swin(1), lambda m: m.permute, None),
    "torchvision-swin_v2_t": (_torchvision_swin(2), lambda m: m.permute, None),
    "hf-swin": (_hf("SwinConfig", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2,
                    patch_size=4),
                lambda m: m.model.swin.encoder.layers[-1].blocks[-1].layernorm_before, _swin_reshape_transform(2, 2)),
}


def _image(batch=2, size=SIZE, seed=3):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.standard_normal((batch, 3, size, size)), sigma=(0, 0, 2, 2)) * 3
            ).astype(np.float32)


def _export(module, path, size=SIZE, **options):
    return export_module(module, path, preprocessing=Preprocessing(crop=(size, size), resize=None), **options)


def _run(path, image, target, names):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {"image": image, "target": target})))


def _hooked(module, layer, reshape, image, targets):
    """The layer's output and d logit[target] / d output in float64 torch, through ``reshape`` (None:
    the layer's output is [N, C, h, w] already)."""
    module = module.double()
    reshape = reshape or (lambda tensor: tensor)
    kept = {}

    def hook(_, __, output):
        output.register_hook(lambda grad: kept.__setitem__("gradient", grad))
        kept["activation"] = output

    handle = layer.register_forward_hook(hook)
    try:
        logits = module(torch.from_numpy(image).double())
        logits.gather(1, torch.from_numpy(targets)[:, None]).sum().backward()
    finally:
        handle.remove()
    return (reshape(kept["activation"]).detach().numpy(), reshape(kept["gradient"]).detach().numpy(),
            logits.detach().numpy())


_CAM_NAMES = [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_CAM_ACTIVATION,
              contract.OUTPUT_CAM_GRADIENT]


_FILES: dict = {}


def _model_file(name, tmp_path_factory):
    """Each model exported once for this module, with the CAM layer and, where it has global
    attention, the attention outputs."""
    if name not in _FILES:
        path = tmp_path_factory.mktemp("vit") / f"{name}.onnx"
        _export(MODELS[name][0](), path, cam_layer="auto", attention=name in ATTENTION_MODELS)
        _FILES[name] = path
    return _FILES[name]


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    name = request.param
    build, layer_of, reshape = MODELS[name]
    path = _model_file(name, tmp_path_factory)
    image = _image()
    out = _run(path, image, np.array([-1, 3], dtype=np.int64), _CAM_NAMES)
    module = build()
    activation, gradient, logits = _hooked(module, layer_of(module), reshape, image, out[contract.OUTPUT_TARGET_INDEX])
    return name, path, module, layer_of(module), image, out, activation, gradient, logits


@pytest.mark.slow
def test_cam_layer_auto_is_the_last_blocks_first_layer_norm_on_its_patch_grid(exported):
    name, _, _, _, _, out, activation, gradient, logits = exported
    assert rel(out[contract.OUTPUT_LOGITS], logits, "logits") <= TOLERANCE
    err_a = rel(out[contract.OUTPUT_CAM_ACTIVATION], activation, f"{name} cam_activation")
    err_g = rel(out[contract.OUTPUT_CAM_GRADIENT], gradient, f"{name} cam_gradient")
    assert err_a <= TOLERANCE, f"{name}: cam_activation is not the hooked layer's output: {err_a:.3g}"
    assert err_g <= TOLERANCE, f"{name}: cam_gradient is not the hooked layer's gradient: {err_g:.3g}"


@pytest.mark.slow
def test_the_metadata_names_the_module_auto_took(exported):
    import onnx

    name, path, module, layer, *_ = exported
    expected = next(n for n, m in module.named_modules() if m is layer).replace(".inner", "").removesuffix(".tap")
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    cam_layer = contract.ModelMetadata.from_props(props).cam_layer
    assert cam_layer.startswith(f"auto ({expected}: "), f"{name}: {cam_layer!r} does not name {expected}"


@pytest.mark.slow
def test_grad_cam_on_a_vit_matches_pytorch_grad_cams_reshape_transform_recipe(exported):
    pgc = require("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    name, _, module, layer, image, out, _, _, _ = exported
    activation = out[contract.OUTPUT_CAM_ACTIVATION]
    cam = pgc.GradCAM(model=module.double(), target_layers=[layer], reshape_transform=MODELS[name][2])
    # compare on the patch grid: pytorch-grad-cam min-max scales, then resizes to this size
    cam.get_target_width_height = lambda input_tensor: (activation.shape[3], activation.shape[2])
    targets = [ClassifierOutputTarget(int(t)) for t in out[contract.OUTPUT_TARGET_INDEX]]
    expected = cam(input_tensor=torch.from_numpy(image).double(), targets=targets)
    ours = grad_cam(activation, out[contract.OUTPUT_CAM_GRADIENT])
    assert ours.max() > 0, f"{name}: Grad-CAM map is all zeros"
    # pytorch-grad-cam scales each map twice (per layer, then after aggregating the layers)
    ours = _scale_cam_image(_scale_cam_image(ours))
    err = float(np.abs(ours - expected).max())
    assert err <= 1e-4, f"{name} Grad-CAM: {err:.3g} (maps in [0, 1])"


def _scale_cam_image(maps):
    """pytorch-grad-cam's scale_cam_image (without resizing), in float32 as it returns."""
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    return (maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))).astype(np.float32)


@pytest.mark.slow
def test_grad_cam_runs_from_gradmap_run_on_a_vit(exported, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from gradmap.cli import main

    name, path, *_ = exported
    if name != "timm-vit_tiny":
        pytest.skip("one ViT is enough for the command line")
    pictures = tmp_path / "in"
    pictures.mkdir()
    Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)).save(pictures / "a.png")
    result = CliRunner().invoke(main, ["run", str(path), str(pictures), "-o", str(tmp_path / "out"),
                                       "--method", "grad-cam", "--format", "npy"])
    assert result.exit_code == 0, result.output
    cams = list((tmp_path / "out").rglob("*.cam.npy"))
    assert len(cams) == 1, f"expected one .cam.npy, got {cams}"
    values = np.load(cams[0])
    assert values.shape[-2:] == (SIZE, SIZE) and np.isfinite(values).all() and values.max() > 0


def _two_blocks():
    module = MODELS["timm-vit_tiny"][0]()
    module.blocks = module.blocks[:2]  # two blocks: these tests check the layer lookup, not the model
    return module


@pytest.mark.slow
def test_cam_layer_by_module_name_on_a_vit(tmp_path):
    path = tmp_path / "named.onnx"
    _export(_two_blocks(), path, cam_layer="blocks.0.norm2", verify=False)
    image = _image(batch=1)
    out = _run(path, image, np.array([-1], dtype=np.int64), _CAM_NAMES)
    module = _two_blocks()
    activation, gradient, _ = _hooked(module, module.blocks[0].norm2, _tokens_to_grid(1), image,
                                      out[contract.OUTPUT_TARGET_INDEX])
    assert rel(out[contract.OUTPUT_CAM_ACTIVATION], activation, "blocks.0.norm2") <= TOLERANCE
    assert rel(out[contract.OUTPUT_CAM_GRADIENT], gradient, "blocks.0.norm2 gradient") <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_swins_last_norm1_by_name_matches_pytorch_grad_cams_swin_recipe(tmp_path, version):
    """The layer pytorch-grad-cam's Swin tutorial hooks (the last block's norm1, channels last) named on
    torchvision's Swin: gradmap's map is [N, C, 2, 2] on the final grid, as the documented
    reshape_transform makes it, and Grad-CAM matches."""
    pgc = require("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    build = _torchvision_swin(version)
    path = tmp_path / "swin.onnx"
    report = _export(build(), path, cam_layer="features.7.0.norm1", verify=False)
    assert report is not None
    image = _image()
    out = _run(path, image, np.array([-1, 3], dtype=np.int64), _CAM_NAMES)
    assert out[contract.OUTPUT_CAM_ACTIVATION].shape[1:] == (192, 2, 2), out[contract.OUTPUT_CAM_ACTIVATION].shape
    module = build()
    reshape = _swin_reshape_transform(2, 2)
    activation, gradient, _ = _hooked(module, module.features[7][0].norm1, reshape, image,
                                      out[contract.OUTPUT_TARGET_INDEX])
    assert rel(out[contract.OUTPUT_CAM_ACTIVATION], activation, "norm1") <= TOLERANCE
    assert rel(out[contract.OUTPUT_CAM_GRADIENT], gradient, "norm1 gradient") <= TOLERANCE
    cam = pgc.GradCAM(model=module, target_layers=[module.features[7][0].norm1], reshape_transform=reshape)
    cam.get_target_width_height = lambda input_tensor: (2, 2)
    expected = cam(input_tensor=torch.from_numpy(image).double(),
                   targets=[ClassifierOutputTarget(int(t)) for t in out[contract.OUTPUT_TARGET_INDEX]])
    ours = _scale_cam_image(_scale_cam_image(grad_cam(out[contract.OUTPUT_CAM_ACTIVATION],
                                                      out[contract.OUTPUT_CAM_GRADIENT])))
    err = float(np.abs(ours - expected).max())
    assert err <= 1e-4, f"Swin V{version} Grad-CAM on features.7.0.norm1: {err:.3g}"


@pytest.mark.slow
def test_a_query_key_norm_is_not_taken_for_the_token_map(tmp_path):
    """timm's qk_norm normalizes queries and keys [N, heads, T, d] over d, nearer the softmax than
    norm1: auto must pass it by (it once took it for a channels-last map)."""
    import onnx

    path = tmp_path / "qk.onnx"
    _export(_timm("vit_tiny_patch16_224", depth=2, qk_norm=True)(), path, cam_layer="auto", verify=False)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    cam_layer = contract.ModelMetadata.from_props(props).cam_layer
    assert cam_layer.startswith("auto (blocks.1.norm1: ") and "1 prefix token(s) + 4x4 patch grid" in cam_layer, \
        cam_layer


@pytest.mark.slow
def test_a_cam_layer_that_is_no_feature_or_token_map_is_refused(tmp_path):
    with pytest.raises(ExportError, match=r"not a \[N, C, H, W\] feature map.*nor a \[N, tokens, C\] token map") as info:
        _export(_two_blocks(), tmp_path / "bad.onnx", cam_layer="head", verify=False)
    assert "--cam-layer 'head'" in str(info.value), f"the error does not name the layer: {info.value}"


@pytest.mark.parametrize("tokens,size,expected", [
    (17, (64, 64), (1, (4, 4))),      # class token + 4x4 patches
    (18, (64, 64), (2, (4, 4))),      # class and distillation tokens (DeiT)
    (21, (64, 64), (5, (4, 4))),      # class + 4 register tokens
    (196, (224, 224), (0, (14, 14))),  # no prefix (a mean-pooled ViT)
    (9, (64, 32), (1, (4, 2))),       # a non-square input: the grid has its aspect
    (3, (64, 48), None),              # no grid of a 4:3 aspect fits 3 tokens
])
def test_token_grid(tokens, size, expected):
    from gradmap.graph.gradient._layers import token_grid

    assert token_grid(tokens, size) == expected


def test_a_token_map_of_no_patch_grid_is_refused():
    import onnx_ir as ir

    from gradmap.graph.gradient._layers import _as_layer

    value = ir.Value(name="t", shape=ir.Shape(["batch", 7, 32]), type=ir.TensorType(ir.DataType.FLOAT))
    with pytest.raises(ExportError, match="7 tokens are not up to 16 class or register tokens plus a patch grid"):
        _as_layer(value, (64, 48), "'t'")


# -- attention rollout and attention relevance -------------------------------------------------------
_ATTENTION_NAMES = [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_ATTENTION,
                    contract.OUTPUT_ATTENTION_GRADIENT]


def _timm_probabilities(module, image, targets):
    """Each block's attention probabilities and d logit[target] / d probabilities, float64 torch:
    timm's unfused attention path (the exported model uses F.scaled_dot_product_attention) with a
    hook on its attention dropout, whose input is the softmax."""
    module = module.double()
    kept = []
    hooks = []
    for block in module.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda _, inputs, __: kept.append(inputs[0])))
    try:
        logits = module(torch.from_numpy(image).double())
    finally:
        for hook in hooks:
            hook.remove()
    score = logits.gather(1, torch.from_numpy(targets)[:, None]).sum()
    return kept, list(torch.autograd.grad(score, kept))


def _hf_probabilities(module, image, targets):
    module = module.double()
    out = module.model(pixel_values=torch.from_numpy(image).double(), output_attentions=True)
    score = out.logits.gather(1, torch.from_numpy(targets)[:, None]).sum()
    attentions = list(out.attentions)
    return attentions, list(torch.autograd.grad(score, attentions))


def _torchvision_probabilities(module, image, targets):
    """torchvision's nn.MultiheadAttention written out (bench/attention_reference.py) so that its
    probabilities are tensors of the autograd graph; the logits must still be the module's own (checked)."""
    module = module.double()
    x = torch.from_numpy(image).double()
    with torch.no_grad():
        expected = module(x)
    kept = attention_reference.write_out_attention(module)
    logits = module(x)
    assert torch.allclose(logits, expected, rtol=0, atol=1e-9 * float(expected.abs().max())), \
        "the written-out attention does not reproduce torchvision's"
    score = logits.gather(1, torch.from_numpy(targets)[:, None]).sum()
    return kept, list(torch.autograd.grad(score, kept))


#: tokens before the patches where there is more than the class token (4 register tokens)
PREFIX = {"timm-vit_registers": 5}
# the models of MODELS with global attention, and how to take their probabilities in torch
ATTENTION_MODELS = {
    "timm-vit_tiny": _timm_probabilities,
    "timm-vit_registers": _timm_probabilities,
    "torchvision-vit_b_16": _torchvision_probabilities,
    "hf-vit": _hf_probabilities,
}


@pytest.fixture(scope="module", params=list(ATTENTION_MODELS))
def with_attention(request, tmp_path_factory):
    name = request.param
    build, probabilities_of = MODELS[name][0], ATTENTION_MODELS[name]
    path = _model_file(name, tmp_path_factory)
    image = _image()
    out = _run(path, image, np.array([-1, 3], dtype=np.int64), _ATTENTION_NAMES)
    attentions, gradients = probabilities_of(build(), image, out[contract.OUTPUT_TARGET_INDEX])
    return name, path, image, out, attentions, gradients


@pytest.mark.slow
def test_attention_outputs_are_the_probabilities_and_their_gradients(with_attention):
    name, _, _, out, attentions, gradients = with_attention
    expected = torch.stack(attentions, dim=1).detach().numpy()
    assert rel(out[contract.OUTPUT_ATTENTION], expected, f"{name} attention") <= TOLERANCE
    expected = torch.stack(gradients, dim=1).detach().numpy()
    assert rel(out[contract.OUTPUT_ATTENTION_GRADIENT], expected, f"{name} attention gradient") <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_attention_rollout_matches_the_papers_rule(with_attention, head_fusion):
    from gradmap.runtime.attention import attention_rollout, token_map
    from gradmap.runtime.model import SaliencyModel

    name, path, _, out, attentions, _ = with_attention
    layout = SaliencyModel(path, provider="cpu", threads=1).metadata.attention
    ours = token_map(attention_rollout(out[contract.OUTPUT_ATTENTION], head_fusion), layout)
    expected = attention_reference.rollout([a.detach() for a in attentions], head_fusion, PREFIX.get(name, 1))
    expected = expected.reshape(ours.shape).numpy()
    err = rel(ours, expected, f"{name} rollout")
    assert err <= TOLERANCE, f"{name} attention rollout ({head_fusion}): {err:.3g}"


@pytest.mark.slow
def test_attention_relevance_matches_chefer_et_al(with_attention):
    from gradmap.runtime.attention import attention_relevance, token_map
    from gradmap.runtime.model import SaliencyModel

    name, path, _, out, attentions, gradients = with_attention
    layout = SaliencyModel(path, provider="cpu", threads=1).metadata.attention
    ours = token_map(attention_relevance(out[contract.OUTPUT_ATTENTION], out[contract.OUTPUT_ATTENTION_GRADIENT]),
                     layout)
    expected = attention_reference.relevance([a.detach() for a in attentions], gradients, PREFIX.get(name, 1))
    expected = expected.reshape(ours.shape).numpy()
    err = rel(ours, expected, f"{name} relevance")
    assert err <= TOLERANCE, f"{name} attention relevance: {err:.3g}"
    # the class matters: another target gives another map
    assert not np.allclose(ours[0], ours[1] * ours[0].max() / ours[1].max())


@pytest.mark.slow
def test_attention_methods_run_from_gradmap_run(with_attention, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from gradmap.cli import main

    name, path, *_ = with_attention
    if name != "timm-vit_tiny":
        pytest.skip("one ViT is enough for the command line")
    pictures = tmp_path / "in"
    pictures.mkdir()
    Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)).save(pictures / "a.png")
    for method in ("attention-rollout", "attention-relevance"):
        out = tmp_path / method
        result = CliRunner().invoke(main, ["run", str(path), str(pictures), "-o", str(out), "--method", method,
                                           "--format", "npy"])
        assert result.exit_code == 0, result.output
        cams = list(out.rglob("*.cam.npy"))
        assert len(cams) == 1, f"{method}: expected one .cam.npy, got {cams}"
        values = np.load(cams[0])
        assert values.shape[-2:] == (SIZE, SIZE) and np.isfinite(values).all() and values.max() > 0, method


@pytest.mark.slow
def test_distilled_deit_reads_its_class_and_distillation_tokens(tmp_path):
    from gradmap.runtime.model import SaliencyModel

    path = tmp_path / "deit.onnx"
    _export(_timm("deit_tiny_distilled_patch16_224", depth=1)(), path, attention=True, verify=False)
    layout = SaliencyModel(path, provider="cpu", threads=1).metadata.attention
    assert layout == {"layers": 1, "heads": 3, "tokens": 18, "prefix_tokens": 2, "grid": [4, 4], "readout": [0, 1]}


@pytest.mark.slow
@pytest.mark.parametrize("model,message", [
    ("swin", "windowed attention"),
    ("cnn", "no self-attention"),
])
def test_attention_on_a_model_without_global_attention_is_refused(tmp_path, model, message):
    if model == "swin":
        module = MODELS["timm-swin"][0]()
    else:
        module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                     torch.nn.Linear(4, 3)).eval()
    with pytest.raises(ExportError, match=message):
        _export(module, tmp_path / "x.onnx", attention=True, verify=False)


def test_attention_methods_refuse_a_model_exported_without_attention(linear_model):
    from gradmap.runtime.methods import MethodSpec, UnsupportedMethodError, attribute

    with pytest.raises(UnsupportedMethodError, match="export it with --attention"):
        attribute(linear_model, MethodSpec("attention-relevance"), np.zeros((1, 3, 32, 32), np.float32),
                  np.array([-1]))


@pytest.mark.parametrize("model", ["onnx:model.onnx", "keras:MobileNetV3Small"])
def test_export_attention_is_refused_for_sources_without_it(model):
    from click.testing import CliRunner

    from gradmap.cli import main

    result = CliRunner().invoke(main, ["export", model, "-o", "x.onnx", "--attention"])
    assert result.exit_code == 2, result.output
    assert "--attention: only for torchvision, timm: and hf: models" in result.output


@pytest.mark.parametrize("name", ["timm-vit_tiny", "hf-vit"])
def test_forward_only_vits_give_the_full_exports_forward_maps(tmp_path_factory, name):
    """--no-gradient with --cam-layer auto and --attention on a timm and a Transformers ViT: the file holds
    the token map and the attention probabilities, no gradient; EigenCAM, Score-CAM and attention
    rollout equal those of the full export."""
    from gradmap.runtime import SaliencyModel
    from gradmap.runtime.methods import MethodSpec, attribute

    full_path = _model_file(name, tmp_path_factory)
    path = tmp_path_factory.mktemp("vit_forward") / f"{name}.onnx"
    report = _export(MODELS[name][0](), path, cam_layer="auto", attention=True, gradient=False)
    assert report.gradient_error is None and report.logits_error < TOLERANCE
    full, forward = (SaliencyModel(p, provider="cpu", threads=1) for p in (full_path, path))
    assert forward.metadata.methods == ("eigen-cam", "score-cam", "occlusion", "rise", "attention-rollout")
    assert forward.metadata.attention == full.metadata.attention
    image, targets = _image(), np.array([-1, 3], np.int64)
    for spec in (MethodSpec("eigen-cam"), MethodSpec("score-cam"), MethodSpec("attention-rollout")):
        expected = attribute(full, spec, image, targets)[2]
        actual = attribute(forward, spec, image, targets)[2]
        assert rel(actual, expected, f"{name} {spec.name}") <= 1e-5
