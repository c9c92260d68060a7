"""Which forward value is the CAM layer, and how it becomes an [N, C, h, w] feature map.

    CNN         the input of the last global spatial pooling, or the [N, C, H, W] map flattened
                into the classifier                                   [N, C, h, w] as it is
    Swin-style  a LayerNorm output [N, h, w, C] (channels last)       Transpose(perm=[0, 3, 1, 2])
    ViT-style   a token map [N, p + h*w, C]: p class, distillation or register tokens first, then
                the patch tokens in row-major order                   Slice(p:) -> Reshape(N, h, w, C)
                                                                      -> Transpose(perm=[0, 3, 1, 2])

``auto`` picks the CNN map or, when an attention Softmax comes after it on the path to the logits
(or there is none), the output of the LayerNorm that feeds the last attention: the last block's
first LayerNorm (timm ``blocks[-1].norm1``, Transformers ``layernorm_before``), the layer
pytorch-grad-cam's ViT example uses with its ``reshape_transform``. An RMSNorm module counts as
the norm (it exports as elementwise ops); a block with no norm before its attention (Swin V2's
post-norm, LeViT's BatchNorm) gives the residual stream entering it. Doing the reshape in the graph
gives every CAM method, in the runtime and in the web page, the same [N, C, h, w] map a CNN gives.
"""

from __future__ import annotations

import ast
import logging
import math
import re
from dataclasses import dataclass

import onnx_ir as ir

from ..errors import ExportError
from ._context import GradContext

logger = logging.getLogger(__name__)

__all__ = ["AttentionLayers", "CamLayer", "MAX_PREFIX_TOKENS", "find_attention", "find_cam_layer", "module_of",
           "token_grid", "to_feature_map"]

_GLOBAL_POOLS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")
#: The most tokens before the patch grid that a token map may have (class, distillation and
#: register tokens: timm's vit_*_reg4 has 5, DINOv2 with registers 5).
MAX_PREFIX_TOKENS = 16
#: Producers whose rank-4 output is channels last: a LayerNorm over the last axis (Swin's blocks).
_CHANNELS_LAST_PRODUCERS = ("LayerNormalization",)


@dataclass(frozen=True)
class CamLayer:
    """A CAM layer: the forward ``value`` and how it maps to [N, C, h, w].

    ``layout`` is ``nchw`` (as it is), ``nhwc`` (channels last) or ``tokens`` ([N, T, C] with
    ``prefix`` tokens before an ``grid`` = (h, w) grid of patch tokens).
    """

    value: ir.Value
    layout: str = "nchw"
    prefix: int = 0
    grid: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.value.name

    @property
    def cells(self) -> int | None:
        """h * w of the map the layer becomes (None where the shape is not static)."""
        if self.grid is not None:
            return self.grid[0] * self.grid[1]
        dims = list(self.value.shape) if self.value.shape is not None else []
        spatial = dims[1:3] if self.layout == "nhwc" else dims[2:4]
        return spatial[0] * spatial[1] if len(spatial) == 2 and all(isinstance(d, int) for d in spatial) else None

    @property
    def module(self) -> str | None:
        """The torch module whose output the value is (:func:`module_of`), for a traced torch model."""
        return module_of(self.value)

    def describe(self) -> str:
        """The torch module (where there is one) and the value's name, with the reshape for a token
        or channels-last map: ``blocks.5.norm1: layer_norm_10, 1 prefix token(s) + 4x4 patch grid``; a
        map of one cell says so."""
        name = f"{self.module}: {self.name}" if self.module else self.name
        if self.layout == "tokens":
            name = f"{name}, {self.prefix} prefix token(s) + {self.grid[0]}x{self.grid[1]} patch grid"
        elif self.layout == "nhwc":
            name = f"{name}, channels last"
        return name + (", one cell at this input size: its CAM maps are constant" if self.cells == 1 else "")


def _name_scopes(node: ir.Node | None) -> list[str]:
    """The torch module names a traced node sits in, outermost first (torch.onnx's
    ``pkg.torch.onnx.name_scopes``: ``['', 'blocks', 'blocks.5', 'blocks.5.norm1', 'layer_norm_10']``)."""
    text = node.metadata_props.get("pkg.torch.onnx.name_scopes") if node is not None else None
    if not text:
        return []
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [s for s in scopes if isinstance(s, str)]


def module_of(value: ir.Value) -> str | None:
    """The innermost torch module whose output ``value`` is, from the exporter's name scopes, or None
    (no scopes, or the value is an intermediate of that module's forward, which its own code uses)."""
    scopes = _name_scopes(value.producer())
    if len(scopes) < 2 or not scopes[-2]:
        return None
    module = scopes[-2]  # the last scope is the op itself
    if any(module in _name_scopes(consumer) for consumer in value.consumers()):
        return None
    return module


def _static(dims) -> bool:
    return dims is not None and all(isinstance(d, int) for d in list(dims)[1:])


def token_grid(tokens: int, image_size: tuple[int, int]) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens p, patch grid (h, w)) with ``tokens = p + h*w``, the grid of the image's aspect
    (``h / w = H / W``, ``H / h`` a whole number), and the fewest prefix tokens; None if none fits."""
    height, width = image_size
    for prefix in range(0, min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        patches = tokens - prefix
        h = round(math.sqrt(patches * height / width))
        if h < 1 or patches % h:
            continue
        w = patches // h
        if h * width == w * height and height % h == 0 and width % w == 0:
            return prefix, (h, w)
    return None


def _image_size(graph: ir.Graph) -> tuple[int, int]:
    dims = graph.inputs[0].shape
    if dims is None or len(dims) != 4 or not _static(dims):
        raise ExportError(f"the image input's shape {dims} is not [N, 3, H, W] with a static H and W")
    return int(dims[2]), int(dims[3])


def _as_layer(value: ir.Value, image_size: tuple[int, int], what: str) -> CamLayer:
    """``value`` as a CAM layer: an NCHW map, a channels-last LayerNorm output or a token map;
    ExportError naming ``what`` (the --cam-layer given) otherwise."""
    dims = value.shape
    producer = value.producer()
    if dims is not None and len(dims) == 3 and _static(dims):
        fit = token_grid(int(dims[1]), image_size)
        if fit is None:
            raise ExportError(
                f"--cam-layer {what}: its output {value.name} [N, {dims[1]}, {dims[2]}] is not a token map of the "
                f"{image_size[0]}x{image_size[1]} input: {dims[1]} tokens are not up to {MAX_PREFIX_TOKENS} class or "
                "register tokens plus a patch grid of the input's aspect")
        prefix, grid = fit
        return CamLayer(value, "tokens", prefix, grid)
    if dims is not None and len(dims) == 4 and _static(dims):
        if _channels_last_value(value):
            h, w = int(dims[1]), int(dims[2])
            if h * image_size[1] == w * image_size[0]:
                return CamLayer(value, "nhwc", grid=(h, w))
        return CamLayer(value)
    raise ExportError(f"--cam-layer {what}: its output {value.name} has shape {dims}, not a [N, C, H, W] feature "
                      "map, a channels-last [N, H, W, C] LayerNorm output nor a [N, tokens, C] token map")


def _channels_last(layer_norm: ir.Node) -> bool:
    axis = layer_norm.attributes.get("axis")
    rank = len(layer_norm.outputs[0].shape)
    return (axis.as_int() if axis is not None else -1) % rank == rank - 1


def find_cam_layer(graph: ir.Graph, nodes: list[ir.Node], name: str) -> CamLayer:
    """The CAM layer: ``auto`` (see the module docstring), a torch module name (its last output,
    from the exporter's ``pkg.torch.onnx.name_scopes``) or an ONNX value name. A layer of one cell at
    this input size (a 1x1 map: every CAM map of it is constant) is taken, with a warning that says so
    and names larger layers."""
    image_size = _image_size(graph)
    layer = _find(nodes, name, image_size)
    if layer.cells == 1:
        # suggest maps from before the stride that made the one cell, not a later block's internals
        reducer = _one_cell_reducer(layer.value) if layer.layout == "nchw" else None
        before = nodes.index(reducer) if reducer in nodes else len(nodes)
        logger.warning("--cam-layer %s: %s is a map of one cell at this %dx%d input, so every CAM map of it is "
                       "constant: export at a larger input size or name an earlier layer%s", name,
                       layer.module or layer.name, *image_size, _suggestions(nodes, image_size, before=before))
    return layer


def _find(nodes: list[ir.Node], name: str, image_size: tuple[int, int]) -> CamLayer:
    if name == "auto":
        position = {node: i for i, node in enumerate(nodes)}
        pooled = _pooled_map(nodes)
        attention = _attention_input(nodes, image_size)
        if attention is not None and (pooled is None or position[attention.producer()] > position[pooled[1]]):
            return _as_layer(attention, image_size, "auto")
        if pooled is not None:
            return _pooled_layer(pooled[0], image_size)
        tokens = _pooled_tokens(nodes, image_size)
        if tokens is not None:
            return _as_layer(tokens, image_size, "auto")
        raise ExportError("--cam-layer auto: no [N, C, H, W] feature map is pooled or flattened on the way to the "
                          "logits and no attention layer reads a token map: name a layer instead"
                          + _suggestions(nodes, image_size))
    for value in (v for n in nodes for v in n.outputs):
        if value.name == name:
            return _as_layer(value, image_size, repr(name))
    found = None
    for node in nodes:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
        if f"'{name}'" in scopes:
            found = node.outputs[0]
    if found is None:
        raise ExportError(f"--cam-layer {name!r}: no module or value of that name on the path to the logits")
    return _as_layer(found, image_size, repr(name))


def _suggestions(nodes: list[ir.Node], image_size: tuple[int, int], count: int = 3, before: int | None = None) -> str:
    """``", e.g. --cam-layer A (4x4 tokens), ..."``: the last module outputs on the path that are
    feature or token maps of more than one cell, nearest the logits first, less modules called more
    than once (their name gives one of their outputs only); ``before``: among ``nodes[:before]`` only.
    Empty if none."""
    found: list[str] = []
    modules = [module_of(v) for node in nodes for v in node.outputs]
    twice = {m for m in modules if m is not None and modules.count(m) > 1}  # one module called twice: ambiguous
    for node in reversed(nodes[:before]):
        for value in node.outputs:
            module = module_of(value)
            if module is None or module in twice or any(module == f.split(" ")[0] for f in found):
                continue
            try:
                layer = _as_layer(value, image_size, module)
            except ExportError:
                continue
            grid = layer.grid or tuple(int(d) for d in list(value.shape)[2:4])
            if grid[0] * grid[1] > 1:
                kind = {"tokens": "tokens", "nhwc": "channels last", "nchw": "feature map"}[layer.layout]
                found.append(f"{module} ({grid[0]}x{grid[1]} {kind})")
        if len(found) >= count:
            break
    return (", e.g. " + ", ".join(f"--cam-layer {f}" for f in found)) if found else ""


def _pooled_map(nodes: list[ir.Node]) -> tuple[ir.Value, ir.Node] | None:
    """(map, node) of the last global spatial pooling of an [N, C, H, W] map on the path (a
    ReduceMean or ReduceMax over the last axis of the map flattened to [N, C, H*W] counts: Transformers'
    SwiftFormer), or else of the last such map flattened into the classifier (VGG). A map of one cell
    (1x1) counts where the network brought it to one cell by a strided convolution or pooling (a small
    input's last stage: EfficientViT-MSRA at 64x64), not where it is a pooled vector already."""
    for node in reversed(nodes):
        if node.op_type not in _GLOBAL_POOLS:
            continue
        x = _flattened_map(node) or node.inputs[0]
        dims = x.shape
        if dims is None or len(dims) != 4 or not all(isinstance(d, int) and d >= 1 for d in list(dims)[2:]):
            continue
        if x is node.inputs[0] and node.op_type.startswith("Reduce"):
            axes = GradContext.constant_of(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes is None or sorted(int(a) % 4 for a in axes.reshape(-1)) != [2, 3]:
                continue
        if all(d > 1 for d in list(dims)[2:]) or (list(dims)[2:] == [1, 1] and _one_cell_reducer(x) is not None):
            return x, node
    for node in reversed(nodes):
        if node.op_type not in ("Reshape", "Flatten"):
            continue
        x, y = node.inputs[0], node.outputs[0]
        # the whole map per sample: torchvision's attention flattens [T, N, heads, d] to [T*N, C]
        if (x.shape is not None and y.shape is not None and len(x.shape) == 4 and len(y.shape) == 2
                and all(isinstance(d, int) and d > 1 for d in list(x.shape)[1:]) and x.shape[0] == y.shape[0]
                and y.shape[1] == math.prod(list(x.shape)[1:])):
            return x, node
    return None


def _flattened_map(node: ir.Node) -> ir.Value | None:
    """The [N, C, H, W] map that a ReduceMean or ReduceMax over the last axis of [N, C, H*W] pools
    (``x.flatten(2).mean(-1)``), or None."""
    if node.op_type not in ("ReduceMean", "ReduceMax") or len(node.inputs) < 2:
        return None
    flat = node.inputs[0]
    producer = flat.producer()
    axes = GradContext.constant_of(node.inputs[1])
    if (producer is None or producer.op_type not in ("Reshape", "Flatten") or axes is None or flat.shape is None
            or len(flat.shape) != 3 or [int(a) % 3 for a in axes.reshape(-1)] != [2]):
        return None
    x = producer.inputs[0]
    if x is None or x.shape is None or len(x.shape) != 4 or not _static(x.shape):
        return None
    return x if (flat.shape[1] == x.shape[1] and flat.shape[2] == x.shape[2] * x.shape[3]) else None


_STRIDED = ("Conv", "MaxPool", "AveragePool", "LpPool")


def _one_cell_reducer(value: ir.Value) -> ir.Node | None:
    """The strided convolution or pooling among the producers of a 1x1 [N, C, 1, 1] map that brought a
    larger map to one cell (a feature map at a small input), or None where none did (a global pooling
    did: a pooled vector, pooled again)."""
    frontier, seen = [value], {value}
    while frontier:
        following = []
        for current in frontier:
            producer = current.producer()
            if producer is None:
                continue
            one_cell = current.shape is not None and len(current.shape) == 4 and list(current.shape)[2:] == [1, 1]
            for x in producer.inputs:
                if x is None or x in seen or x.producer() is None:
                    continue
                if (one_cell and producer.op_type in _STRIDED and x.shape is not None and len(x.shape) == 4
                        and any(isinstance(d, int) and d > 1 for d in list(x.shape)[2:])):
                    return producer
                seen.add(x)
                following.append(x)
        frontier = following
    return None


def _pooled_layer(value: ir.Value, image_size: tuple[int, int]) -> CamLayer:
    """The pooled [N, C, H, W] map as a CAM layer; where it is no module's output but a Transpose of a
    module's channels-last [N, H, W, C] map (timm's NesT: ``norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1,
    2)``), that module's map, channels last: the layer a user names and hooks."""
    producer = value.producer()
    if (module_of(value) is None and producer is not None and producer.op_type == "Transpose"
            and list(producer.attributes.get_ints("perm", [])) == [0, 3, 1, 2]):
        source = producer.inputs[0]
        if module_of(source) is not None and _is_token_map(source, image_size):
            return CamLayer(source, "nhwc", grid=(int(source.shape[1]), int(source.shape[2])))
    return CamLayer(value)


def _pooled_tokens(nodes: list[ir.Node], image_size: tuple[int, int]) -> ir.Value | None:
    """The [N, tokens, C] token map the classifier averages (ReduceMean over its token axis, or over
    the token axis of its [N, C, tokens] transpose, unsqueezed to [N, C, 1, tokens] as torch's
    AdaptiveAvgPool1d exports): for a transformer whose last attention reads no token map auto can
    take (Transformers' Hiera: its last block pools the queries of the stage before, in that stage's
    unrolled token order). None where there is none, or no attention Softmax comes before it (tokens
    that no attention mixes are a CNN's map flattened, which auto leaves to --cam-layer NAME)."""
    softmax = [i for i, node in enumerate(nodes) if node.op_type == "Softmax"]
    for index in range(len(nodes) - 1, softmax[0] if softmax else len(nodes), -1):
        node = nodes[index]
        if node.op_type not in ("ReduceMean", "ReduceMax") or len(node.inputs) < 2:
            continue
        axes = GradContext.constant_of(node.inputs[1])
        x = node.inputs[0]
        if axes is None or x is None or x.shape is None:
            continue
        axes = sorted(int(a) % len(x.shape) for a in axes.reshape(-1))
        tokens = None
        if len(x.shape) == 3 and axes == [1]:
            tokens = x
        else:
            source = x
            if len(x.shape) == 4 and axes in ([3], [2, 3]) and x.shape[2] == 1 and x.producer() is not None \
                    and x.producer().op_type == "Unsqueeze":
                source = x.producer().inputs[0]
            transpose = source.producer() if len(source.shape or []) == 3 and axes[-1] == len(x.shape) - 1 else None
            if (transpose is not None and transpose.op_type == "Transpose"
                    and list(transpose.attributes.get_ints("perm", [])) == [0, 2, 1]):
                tokens = transpose.inputs[0]
        if tokens is not None and _is_token_map(tokens, image_size) and token_grid(int(tokens.shape[1]), image_size):
            return _module_output(tokens, image_size)
    return None


def _attention_input(nodes: list[ir.Node], image_size: tuple[int, int]) -> ir.Value | None:
    """The token map that feeds the last attention Softmax on the path: the last block's first
    LayerNorm (or RMSNorm) output, or for a block without a norm before its attention (Swin V2's
    post-norm, LeViT's BatchNorm) the residual stream entering it. None where there is none, or where
    the last attention pools its queries (:func:`_pools_queries`)."""
    on_path = set(nodes)
    for node in reversed(nodes):
        probabilities = node.outputs[0]
        if node.op_type == "Softmax" and probabilities.shape is not None and len(probabilities.shape) in (3, 4, 5):
            found = _norm_before(node, on_path, image_size, stream=True)
            return None if found is not None and _pools_queries(probabilities, found, image_size) else found
    return None


def _pools_queries(probabilities: ir.Value, tokens: ir.Value, image_size: tuple[int, int]) -> bool:
    """Whether the attention of ``probabilities`` ([..., queries, keys]; [N, heads, windows, queries,
    keys] for Hiera's mask-unit attention) pools its queries below the patch tokens of the map that
    feeds it: a stage's first block (Hiera), whose input is the previous stage's map, on another grid
    (and in Hiera in another token order), so not the map the classifier's tokens are on. Class
    attention (CaiT, XCiT: the class token's queries alone) pools nothing."""
    dims = list(probabilities.shape)
    queries, keys = dims[-2], dims[-1]
    windows = dims[2] if len(dims) == 5 else 1
    shape = list(tokens.shape)
    count = shape[1] if len(shape) == 3 else (shape[1] * shape[2] if len(shape) == 4 else None)
    if not all(isinstance(d, int) for d in (queries, keys, windows, count)):
        return False
    fit = token_grid(count, image_size) if len(shape) == 3 else (0, None)
    prefix = fit[0] if fit is not None else 0
    return queries < keys and prefix < windows * queries < count


def _norm_before(softmax: ir.Node, on_path: set[ir.Node], image_size: tuple[int, int],
                 stream: bool = False) -> ir.Value | None:
    """The normalized token map nearest upstream of an attention Softmax (over the last axis of
    rank-4 [N, heads, T, T] or rank-3 scores), breadth first: a LayerNormalization's output, or the
    output of a torch LayerNorm/RMSNorm module (an RMSNorm exports as elementwise ops). Norms that
    are no token map (a query/key norm over the head dimension) are passed by. With ``stream``, a
    residual sum met first (no norm between it and the attention: a post-norm block) is returned
    instead, as the module output it is (:func:`_module_output`)."""
    frontier, seen = [softmax], {softmax}
    while frontier:
        following = []
        for current in frontier:
            for value in current.inputs:
                producer = value.producer() if value is not None else None
                if producer is None or producer in seen or producer not in on_path:
                    continue
                seen.add(producer)
                out = producer.outputs[0]
                if _is_normed(out) and _is_token_map(out, image_size):
                    return out
                if stream and _is_residual_sum(producer, on_path) and _is_token_map(out, image_size):
                    return _module_output(out, image_size)
                following.append(producer)
        frontier = following
    return None


_NORM_MODULES = re.compile(r"LayerNorm|RmsNorm|RMSNorm")


def _is_normed(value: ir.Value) -> bool:
    """A LayerNormalization's output, or the output of a torch module whose class is a LayerNorm or
    an RMSNorm (from the exporter's ``pkg.torch.onnx.class_hierarchy``)."""
    producer = value.producer()
    if producer is not None and producer.op_type == "LayerNormalization":
        return True
    if module_of(value) is None:
        return False
    text = producer.metadata_props.get("pkg.torch.onnx.class_hierarchy", "")
    try:
        classes = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return False
    return len(classes) >= 2 and bool(_NORM_MODULES.search(str(classes[-2]).rsplit(".", 1)[-1]))


def _is_residual_sum(node: ir.Node, on_path: set[ir.Node]) -> bool:
    """An Add of two values of one shape, both computed from the image: a residual connection (a
    bias or a position embedding is a constant, not computed from the image)."""
    if node.op_type != "Add" or len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return False
    a, b = node.inputs
    if a.producer() not in on_path or b.producer() not in on_path or a.shape is None or b.shape is None:
        return False
    return [str(d) for d in a.shape] == [str(d) for d in b.shape]


_SHAPE_OPS = ("Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def _module_output(value: ir.Value, image_size: tuple[int, int]) -> ir.Value:
    """``value``, or where it is a module's last op before a reshape (timm's Swin V2 block adds its
    residual on [N, L, C] and returns [N, H, W, C]) the reshaped module output, so that the layer
    has a torch module name."""
    current = value
    while module_of(current) is None:
        consumers = list(current.consumers())
        if len(consumers) != 1 or consumers[0].op_type not in _SHAPE_OPS:
            return value
        current = consumers[0].outputs[0]
        if current.shape is None or not _is_token_map(current, image_size):
            return value
    return current


def _is_token_map(value: ir.Value, image_size: tuple[int, int]) -> bool:
    """[N, tokens, C], or [N, h, w, C] channels last on a grid of the image's aspect (h dividing its
    height): a query or key norm over [N, heads, T, d] is none."""
    dims = value.shape
    if dims is None or not _static(dims):
        return False
    if len(dims) == 3:
        return True
    if len(dims) != 4 or not _channels_last_value(value):
        return False
    h, w = int(dims[1]), int(dims[2])
    return h * image_size[1] == w * image_size[0] and image_size[0] % h == 0


def _channels_last_value(value: ir.Value, depth: int = 8) -> bool:
    """Whether a rank-4 value is [N, H, W, C]: a LayerNorm over its last axis made it, a Reshape of
    [N, tokens, C] tokens that keeps C last, or a residual sum or another elementwise op of such a
    map."""
    producer = value.producer()
    if producer is None or depth == 0:
        return False
    if producer.op_type in _CHANNELS_LAST_PRODUCERS:
        return _channels_last(producer)
    if producer.op_type == "Reshape":
        x = producer.inputs[0]
        return (x is not None and x.shape is not None and len(x.shape) == 3 and value.shape is not None
                and len(value.shape) == 4 and x.shape[2] == value.shape[3] and isinstance(x.shape[2], int))
    if producer.op_type in ("Add", "Mul", "Identity"):
        return any(v is not None and v.shape is not None and len(v.shape) == 4 and v.producer() is not None
                   and [str(d) for d in v.shape] == [str(d) for d in value.shape]
                   and _channels_last_value(v, depth - 1) for v in producer.inputs)
    return False


def to_feature_map(ctx: GradContext, value: ir.Value, layer: CamLayer, batch) -> ir.Value:
    """``value`` (the layer's activation or its gradient, shaped like it) as [N, C, h, w]."""
    dims = layer.value.shape
    if layer.layout == "nchw":
        out = ctx.op("Identity", value)
        out.shape = ir.Shape(dims)
    elif layer.layout == "nhwc":
        out = ctx.op("Transpose", value, perm=[0, 3, 1, 2])
        out.shape = ir.Shape([batch, dims[3], dims[1], dims[2]])
    else:
        tokens, channels = int(dims[1]), int(dims[2])
        patches = ctx.op("Slice", value, ctx.ints([layer.prefix]), ctx.ints([tokens]), ctx.ints([1])) \
            if layer.prefix else value
        h, w = layer.grid
        grid = ctx.op("Reshape", patches, ctx.ints([-1, h, w, channels]))
        out = ctx.op("Transpose", grid, perm=[0, 3, 1, 2])
        out.shape = ir.Shape([batch, channels, h, w])
    out.type = layer.value.type
    return out


# -- attention probabilities (--attention) ---------------------------------------------------------

@dataclass(frozen=True)
class AttentionLayers:
    """Every self-attention's probabilities on the path, in graph order: Softmax outputs
    [N, heads, T, T] over the ``tokens`` = ``prefix`` + h*w tokens of a token map, and the tokens
    the classifier reads (``readout``: the class token, DeiT's class and distillation tokens, or
    the pooled ones)."""

    probabilities: tuple[ir.Value, ...]
    heads: int
    tokens: int
    prefix: int
    grid: tuple[int, int]
    readout: tuple[int, ...]

    def to_dict(self) -> dict:
        """The model metadata's ``attention`` entry: what the runtime needs to read the outputs."""
        return {"layers": len(self.probabilities), "heads": self.heads, "tokens": self.tokens,
                "prefix_tokens": self.prefix, "grid": list(self.grid), "readout": list(self.readout)}


def find_attention(graph: ir.Graph, nodes: list[ir.Node]) -> AttentionLayers:
    """The attention probabilities for attention rollout and attention relevance: each Softmax on
    the path whose input is queries times keys of one [N, T, C] token map (ViT, DeiT, BEiT,
    DINOv2). ExportError saying why for a graph without them (a CNN) or with windowed attention
    (Swin), whose maps do not chain from layer to layer."""
    image_size = _image_size(graph)
    on_path = set(nodes)
    found: list[tuple[ir.Value, ir.Value | None]] = []  # (probabilities, the token map feeding them)
    for node in nodes:
        if node.op_type != "Softmax" or node.outputs[0].shape is None or len(node.outputs[0].shape) != 4:
            continue
        found.append((node.outputs[0], _norm_before(node, on_path, image_size)))
    if not found:
        raise ExportError("--attention: no self-attention (a Softmax over [N, heads, T, T] scores) on the path to "
                          "the logits: attention rollout and relevance are for vision transformers")
    maps = {t for _, t in found}
    if any(t is None or t.shape is None or len(t.shape) != 3 for t in maps):
        raise ExportError("--attention: the attention layers do not all read a [N, tokens, C] token map "
                          "(windowed attention, as in Swin, or a hybrid): attention rollout needs global "
                          "self-attention over one token set, layer after layer")
    counts = {int(t.shape[1]) for t in maps}
    if len(counts) != 1:
        raise ExportError(f"--attention: the attention layers see different token counts ({sorted(counts)}): "
                          "attention rollout needs one token set through every layer")
    tokens = counts.pop()
    heads = set()
    for probabilities, _ in found:
        dims = list(probabilities.shape)
        if not isinstance(dims[1], int) or any(isinstance(d, int) and d != tokens for d in dims[2:]):
            raise ExportError(f"--attention: attention probabilities {probabilities.name} have shape {dims}, "
                              f"not [N, heads, {tokens}, {tokens}]")
        heads.add(dims[1])
    if len(heads) != 1:
        raise ExportError(f"--attention: the attention layers have different head counts ({sorted(heads)})")
    fit = token_grid(tokens, image_size)
    if fit is None:
        raise ExportError(f"--attention: {tokens} tokens are not up to {MAX_PREFIX_TOKENS} class or register tokens "
                          f"plus a patch grid of the {image_size[0]}x{image_size[1]} input")
    prefix, grid = fit
    last = found[-1][0].producer()
    readout = _readout(nodes[nodes.index(last) + 1:], tokens)
    if not readout:
        raise ExportError("--attention: cannot tell which tokens the classifier reads after the last attention "
                          "(a class token taken with Gather or Slice, or tokens averaged with ReduceMean)")
    return AttentionLayers(tuple(p for p, _ in found), heads.pop(), tokens, prefix, grid, readout)


def _readout(nodes: list[ir.Node], tokens: int) -> tuple[int, ...]:
    """The token indices the classifier reads from an [N, tokens, C] map: Gather(axis=1) of
    constant indices, Slice over axis 1 (a class token kept as [N, 1, C], or a range then
    averaged) or ReduceMean over axis 1 (every token)."""
    read: set[int] = set()
    for node in nodes:
        x = node.inputs[0] if node.inputs else None
        if x is None or x.shape is None or len(x.shape) != 3 or x.shape[1] != tokens:
            continue
        if node.op_type == "Gather":
            axis = node.attributes.get("axis")
            index = GradContext.constant_of(node.inputs[1])
            if axis is not None and axis.as_int() % 3 == 1 and index is not None:
                read.update(int(i) % tokens for i in index.reshape(-1))
        elif node.op_type == "Slice" and len(node.inputs) >= 4:
            starts, ends, axes = (GradContext.constant_of(v) for v in node.inputs[1:4])
            if starts is None or ends is None or axes is None:
                continue
            for start, end, axis in zip(starts.reshape(-1), ends.reshape(-1), axes.reshape(-1)):
                if int(axis) % 3 == 1:
                    read.update(range(*slice(int(start), int(end)).indices(tokens)))
        elif node.op_type == "ReduceMean" and len(node.inputs) > 1:
            axes = GradContext.constant_of(node.inputs[1])
            if axes is not None and [int(a) % 3 for a in axes.reshape(-1)] == [1]:
                read.update(range(tokens))
    return tuple(sorted(read))
