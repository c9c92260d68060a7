"""gradmap's command line. Thin: parses options, calls the library, prints.

Heavy modules (torch for ``export``, onnxruntime for ``run``) are imported inside the command
that needs them so that ``gradmap --help`` starts fast and the runtime never touches torch.
"""

from __future__ import annotations

import os
import sys

import click

from gradmap import __version__, contract
from gradmap.demo import FIGURE_SETTINGS, demo_model, demo_pictures, tuned_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradmap")
def main() -> None:
    """Gradient saliency maps for image classifiers, exported once and run without PyTorch."""


def _numbers(kind: type, count: tuple[int, ...]):
    """A click callback reading ``count`` comma-separated numbers (one number may stand for all)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            numbers = tuple(kind(v) for v in value.replace(" ", "").split(","))
        except ValueError:
            raise click.BadParameter(f"{value!r} is not {' or '.join(map(str, count))} comma-separated numbers")
        if len(numbers) not in count:
            raise click.BadParameter(f"{value!r}: give {' or '.join(map(str, count))} numbers")
        return numbers if len(numbers) > 1 or max(count) == 1 else numbers[0]

    return parse


def _preprocessing_options(command):
    """``gradmap export``'s preprocessing options: a named convention and field-by-field overrides."""
    from gradmap.export.presets import PRESETS

    options = [
        click.option("--preset", "preset_name", type=click.Choice(list(PRESETS)), default=None,
                     help="Preprocessing convention instead of the source's own: "
                          + "; ".join(f"{name}: {text}" for name, text in PRESETS.items()) + "."),
        click.option("--crop", callback=_numbers(int, (1, 2)), metavar="SIZE|H,W",
                     help="The model's input size after the crop (the center crop of the resized picture)."),
        click.option("--resize", callback=_numbers(int, (1, 2)), metavar="SIZE|H,W",
                     help="Resize before the crop: the shorter side (--resize-mode shorter) or H,W."),
        click.option("--resize-mode", type=click.Choice(contract.RESIZE_MODES), default=None,
                     help="shorter: shorter side to --resize; exact: to H,W; keep_ratio(_longest): "
                          "scaled to cover (fit) H,W."),
        click.option("--interpolation", type=click.Choice(contract.INTERPOLATIONS), default=None),
        click.option("--antialias/--no-antialias", default=None,
                     help="--no-antialias: tf.image.resize's bilinear resize (no antialiasing filter, float "
                          "pixels) instead of Pillow's."),
        click.option("--value-range", type=click.Choice(contract.VALUE_RANGES), default=None,
                     help="The pixel scale mean and std apply to."),
        click.option("--channel-order", type=click.Choice(contract.CHANNEL_ORDERS), default=None,
                     help="The model input's channel order (mean and std in that order)."),
        click.option("--mean", callback=_numbers(float, (3,)), metavar="A,B,C", help="Per-channel mean."),
        click.option("--std", callback=_numbers(float, (3,)), metavar="A,B,C", help="Per-channel std."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _preprocessing_overrides(values: dict) -> dict:
    """The preprocessing options the user gave (preset_name and field overrides), for the export."""
    return {key: value for key, value in values.items() if value is not None}


@main.command("export")
@click.argument("model_name", metavar="MODEL")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, writable=True), required=True,
              help="Where to write the ONNX model.")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="torchvision weights name (e.g. DEFAULT, IMAGENET1K_V2); for timm: and hf: models DEFAULT "
                   "or 'pretrained' (their own weights and cache); for keras: names DEFAULT or 'imagenet' (Keras' cache); "
                   "'none' for seeded random weights; or a path to a state-dict or .safetensors file (keras: a "
                   ".weights.h5 file or a .keras model).")
@click.option("--score", type=click.Choice(contract.SCORE_KINDS), default="logit",
              show_default=True, help="What the gradient differentiates.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random weights (--weights none).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset of the exported model.")
@click.option("--backprop", "backprops", multiple=True,
              type=click.Choice([b for b in contract.BACKPROP_OUTPUTS if b != contract.DEFAULT_BACKPROP]),
              help="Also emit the gradient under this ReLU rule (repeatable), sharing the forward pass: "
                   "guided backpropagation or deconvnet (Springenberg et al. 2015).")
@click.option("--cam-layer", default=None, metavar="NAME|auto",
              help="Add a feature map and its gradient as outputs for Grad-CAM: 'auto' (the last feature map "
                   "before global pooling; on a vision transformer the last block's first LayerNorm, its tokens "
                   "on the patch grid), a torch module name (e.g. layer4, blocks.11.norm1), a Keras layer name "
                   "(keras: models, e.g. conv5_block3_out) or an ONNX value name.")
@click.option("--attention", is_flag=True, default=False,
              help="Add every self-attention layer's probabilities and their gradient as outputs, for "
                   "the attention methods (vision transformers with global attention: ViT, DeiT, BEiT; "
                   "torchvision, timm: and hf: models).")
@click.option(f"{contract.GRADIENT_OPTION}/{contract.NO_GRADIENT_OPTION}", "gradient", default=True, show_default=True,
              help="--no-gradient writes the forward graph alone with gradmap's metadata (and --cam-layer's "
                   "feature map, --attention's probabilities), for the methods that need no gradient (occlusion, "
                   "RISE, Score-CAM, EigenCAM, attention rollout; 'gradmap info' lists them), also for a classifier "
                   "whose gradient gradmap cannot build. Its parity check compares the logits.")
@click.option("--target", "engine_target", type=click.Choice(list(contract.TARGETS)), default="portable",
              show_default=True,
              help="The engine the graph is written for: 'portable' is the plain gradient graph every engine "
                   "computes alike (onnxruntime CPU, onnxruntime-web WebAssembly and WebGPU, OpenVINO, GPU "
                   "providers); gradmap's runtime lowers it for onnxruntime's CPU provider when it loads it, "
                   "for the CPU it runs on. 'cpu' writes that lowering into the file (for onnxruntime's CPU "
                   "provider only).")
@click.option("--channel-multiple", type=click.IntRange(min=0), default=None,
              help="--target cpu: pad feature maps with zero channels to a multiple of this: exact, and "
                   "onnxruntime's CPU provider keeps them in its blocked layout (blocks of 16 with AVX-512, "
                   "the default on any exporting machine; 8 with AVX2). 0: no padding.")
@click.option("--external-data", is_flag=True,
              help="Write the weights to OUTPUT.data beside OUTPUT: onnxruntime maps that file into memory "
                   "instead of parsing the weights out of the model, so creating a session peaks lower "
                   "(resnet50: about 40 MB). Keep the two files together; gradmap web needs a single file.")
@click.option("--no-verify", is_flag=True,
              help="Skip the parity check against the source's float64 reference (not recommended).")
@click.option("--trust-model", is_flag=True,
              help="keras: load a legacy .h5 model, a TensorFlow SavedModel directory or a .keras file with Lambda "
                   "layers: these can run code when they are loaded, so only from a source you trust.")
@click.option("--input-name", default=None, metavar="NAME",
              help="onnx: the image input, where the graph has several candidates.")
@click.option("--output-name", default=None, metavar="NAME",
              help="onnx: the score output, where the graph has several candidates.")
@click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default=None,
              help="onnx: the image input's layout, where its shape does not tell (an NHWC input is fed from "
                   "the NCHW image; the gradient and the maps stay NCHW).")
@click.option("--input-size", callback=_numbers(int, (1, 2)), metavar="SIZE|H,W", default=None,
              help="onnx: the input's height and width, where the graph leaves them symbolic (default: --crop); "
                   "keras: the size to build an application at (where Keras allows it) or a saved model's free size.")
@click.option("--labels", default=None, metavar="FILE|imagenet|imagenet-background",
              help="onnx:, keras: class names, one per line (or a JSON list); 'imagenet' (the default for 1000 outputs) "
                   "or 'imagenet-background' (1001 outputs, a background class first).")
@_preprocessing_options
def export_command(model_name: str, output: str, weights: str, score: str, seed: int, opset: int,
                   backprops: tuple[str, ...], cam_layer: str | None, attention: bool, gradient: bool, engine_target: str,
                   channel_multiple: int | None, external_data: bool, no_verify: bool, trust_model: bool,
                   input_name: str | None, output_name: str | None, layout: str | None,
                   input_size: "int | tuple[int, int] | None", labels: str | None,
                   **preprocessing: object) -> None:
    """Export MODEL to an ONNX model with an input-gradient output.

    MODEL is a torchvision classifier name (resnet50), timm:NAME (any timm.list_models() name, pretrained
    tags included: timm:convnext_tiny.fb_in22k_ft_in1k), hf:MODEL_ID_OR_DIR (a Transformers
    AutoModelForImageClassification: a local directory or a hub id in the Hugging Face cache) or
    onnx:PATH (any ONNX image classifier file; needs --preset, as a file does not say how its pictures
    were preprocessed; no torch needed) or keras:NAME|PATH (a keras.applications name with its own
    preprocessing, or a saved .keras/.h5/SavedModel model, which needs --preset; --weights imagenet, none
    or a .weights.h5 file; converted with tf2onnx, no torch needed: pip install 'gradmap[keras]').
    """
    source_options = {}
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    foreign = {"--input-name": input_name, "--output-name": output_name, "--layout": layout,
               "--input-size": input_size, "--labels": labels}
    if model_name.startswith("onnx:"):
        source_options = dict(input_name=input_name, output_name=output_name, layout=layout, input_size=size,
                              labels=labels)
    elif model_name.startswith("keras:"):
        onnx_only = {k: foreign[k] for k in ("--input-name", "--output-name", "--layout")}
        if any(v is not None for v in onnx_only.values()):
            given = ", ".join(k for k, v in onnx_only.items() if v is not None)
            raise click.UsageError(f"{given}: only for onnx:PATH models")
        source_options = dict(input_size=size, labels=labels, trust_model=trust_model)
    elif any(v is not None for v in foreign.values()):
        given = ", ".join(k for k, v in foreign.items() if v is not None)
        raise click.UsageError(f"{given}: only for onnx:PATH and keras: models")
    if attention:
        if model_name.startswith(("onnx:", "keras:")):
            raise click.UsageError("--attention: only for torchvision, timm: and hf: models")
        source_options["attention"] = True
    if trust_model and not model_name.startswith("keras:"):
        raise click.UsageError("--trust-model: only for keras: models")
    try:
        from gradmap.export import ExportError, export_named_model

        report = export_named_model(model_name, output, weights=weights, score=score, seed=seed,
                                    opset=opset, verify=not no_verify, backprops=(contract.DEFAULT_BACKPROP, *backprops),
                                    cam_layer=cam_layer, target=engine_target, channel_multiple=channel_multiple,
                                    external_data=external_data, gradient=gradient,
                                    preprocessing_options=_preprocessing_overrides(preprocessing), **source_options)
    except ImportError as e:  # the source's framework, or onnx, is not installed
        if model_name.startswith("keras:"):
            raise click.ClickException(
                f"'gradmap export keras:...' needs TensorFlow, Keras and tf2onnx ({e.name or e}): "
                "pip install 'gradmap[keras]'") from e
        if model_name.startswith("onnx:"):
            raise click.ClickException(
                f"'gradmap export onnx:...' needs onnx and onnx-ir ({e.name or e}): pip install 'gradmap[onnx]'"
            ) from e
        raise click.ClickException(
            f"'gradmap export' needs PyTorch and ONNX ({e.name or e}): pip install 'gradmap[export]'"
        ) from e
    except ExportError as e:
        raise click.ClickException(str(e)) from e
    click.echo(report.summary())


@main.command("verify")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(exists=True, dir_okay=False))
@click.option("--reference", "spec", required=True, metavar="SPEC",
              help="The source MODEL.onnx was exported from, as gradmap export took it: a torchvision name, "
                   "timm:NAME, hf:ID_OR_DIR, onnx:FILE or keras:NAME|PATH.")
@click.option("--weights", default=None,
              help="The source's weights, as given to gradmap export: DEFAULT/pretrained, none (random, with "
                   "--seed) or a file. Default: what MODEL.onnx's metadata records where its source records "
                   "them there (keras:), else DEFAULT.")
@click.option("--seed", type=int, default=None, help="Seed of random weights (--weights none); default as --weights, else 0.")
@click.option("--trust-model", is_flag=True,
              help="keras: only: load a legacy .h5 model or a SavedModel, which can run code when loaded.")
@click.option("--images", "images", multiple=True, metavar="DIR|FILE",
              help="Pictures to check (folders, files, globs; repeatable), each preprocessed as MODEL.onnx's "
                   "metadata says, for its top class. Default: random batches, as the export's check.")
@click.option("--provider", default="auto", show_default=True,
              help="onnxruntime execution provider(s) MODEL.onnx runs on: auto, cpu, cuda or a comma-separated list.")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="onnxruntime intra-op threads (default: onnxruntime's choice).")
def verify_command(model_path: str, spec: str, weights: str | None, seed: int | None, trust_model: bool,
                   images: tuple[str, ...], provider: str, threads: int | None) -> None:
    """Check MODEL.onnx's logits and gradients against the float64 reference of its source.

    Runs the export's parity check again, on your pictures: the same limits (from the reference's own
    float32 error on each picture, with the model's ReLU and max-pooling decisions replayed). Prints a
    table per picture; exits 1 when a picture differs beyond its limit or cannot be verified.
    """
    try:
        from gradmap.export._verify import verify_file
        from gradmap.graph import ExportError
    except ImportError as e:
        raise click.ClickException(f"'gradmap verify' needs onnx and onnx-ir ({e.name or e}): "
                                   "pip install 'gradmap[onnx]'") from e
    pictures: list[str] = []
    if images:
        from gradmap.runtime.io import expand_inputs

        pictures, problems = expand_inputs(images)
        for given, reason in problems:
            click.echo(f"{given}: {reason}", err=True)
        if problems or not pictures:
            raise click.BadParameter("no pictures to check" if not problems else
                                     f"{len(problems)} of the inputs matched no picture", param_hint="'--images'")
    try:
        checks, result = verify_file(model_path, spec, pictures, weights=weights, seed=seed, provider=provider,
                                     threads=threads, trust_model=trust_model)
    except ImportError as e:
        raise click.ClickException(f"--reference {spec}: needs {e.name or e}, which is not installed") from e
    except ValueError as e:  # an unavailable provider
        raise click.BadParameter(str(e), param_hint="'--provider'") from e
    except ExportError as e:  # ParityError included
        raise click.ClickException(str(e)) from e
    forward_only = not (checks[0].check.gradient_errors if checks else result.passed.gradient_errors)
    if not pictures:
        check = result.passed
        gradient = ("no gradient (a forward-only model)" if forward_only else
                    f"gradient {check.gradient_error:.3g} (limit {check.gradient_limit:.3g})")
        click.echo(f"{model_path} matches {spec} on a random batch (batch {len(result.batches)} of up to 8): "
                   f"logits {check.logits_error:.3g} (limit {check.logits_limit:.3g}), {gradient}, "
                   "max|Δ| / max|reference|")
        return
    click.echo(f"{'picture':<32} {'class':<24} {'logits':>9} {'limit':>9} {'gradient':>9} {'limit':>9}  "
               f"{'replayed':<11} result")
    failed = []
    for item in checks:
        c = item.check
        verdict = "ok" if c.passed else ("cannot verify" if c.unverifiable else "MISMATCH")
        name = os.path.basename(item.picture)
        label = f"{item.target_index} {item.label}"
        gradient = f"{'-':>9} {'-':>9}" if forward_only else f"{c.gradient_error:>9.2e} {c.gradient_limit:>9.2e}"
        click.echo(f"{name[:32]:<32} {label[:24]:<24} {c.logits_error:>9.2e} {c.logits_limit:>9.2e} "
                   f"{gradient}  {c.replayed:<11} {verdict}")
        if not c.passed:
            failed.append(f"{item.picture}: {c.unverifiable or '; '.join(c.problems)}")
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(checks)} pictures differ from {spec} beyond the "
                                   "limits or cannot be verified (max|Δ| / max|reference|):\n  " + "\n  ".join(failed))
    click.echo(f"all {len(checks)} pictures match {spec}")


_FORMAT_NAMES = contract.OUTPUT_FORMATS
_PROGRESS_THRESHOLD = 3  # show a progress bar when there are more pictures than this


def _split_formats(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    formats = [f.strip().lower() for value in values for f in value.split(",") if f.strip()]
    unknown = [f for f in formats if f not in _FORMAT_NAMES]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: choose from {', '.join(_FORMAT_NAMES)}")
    return tuple(dict.fromkeys(formats)) or contract.DEFAULT_OUTPUT_FORMATS


def _load_model(path: str, provider: str, threads: int | None, cache: bool = True, cpu_block: str | None = None):
    from gradmap.runtime import GradmapModelError, SaliencyModel
    from gradmap.runtime._lowering import CpuBlockError

    try:
        return SaliencyModel(path, provider=provider, threads=threads, cache_dir=None if cache else False,
                             cpu_block=cpu_block)
    except (GradmapModelError, CpuBlockError) as e:
        raise click.ClickException(str(e)) from e
    except ValueError as e:  # provider not available
        raise click.BadParameter(str(e), param_hint="'--provider'") from e


def _setting_option(setting: contract.Setting) -> dict:
    """click's form of a method setting: its type, range or choices, default and help, from the table."""
    users = contract.methods_using(setting.name)
    defaults = {next(s.default for s in contract.method(m).all_settings if s.name == setting.name) for m in users}
    if setting.type == "choice":
        kind: click.ParamType = click.Choice(setting.choices)
    else:
        bounded = setting.minimum is not None or setting.maximum is not None
        if setting.type == "int":
            kind = click.IntRange(setting.minimum, setting.maximum) if bounded else click.INT
        else:
            kind = click.FloatRange(setting.minimum, setting.maximum) if bounded else click.FLOAT
    scope = "" if len(users) == len(contract.METHODS) else f"{', '.join(users)}: "
    if len(defaults) == 1:  # one default: shown; else each method's own applies
        return {"type": kind, "default": setting.default, "show_default": True, "help": scope + setting.help}
    per_method = ", ".join(f"{m} {next(s.default for s in contract.method(m).settings if s.name == setting.name)}"
                           for m in users)
    return {"type": kind, "default": None, "help": f"{scope}{setting.help} [default: {per_method}]"}


def _method_setting_options(exclude: tuple[str, ...] = ()):
    """One ``--NAME`` option per setting of the method table (see :data:`gradmap.contract.SETTINGS`);
    the command receives them as keyword arguments named after the settings."""
    def decorate(command):
        for name, setting in reversed(contract.SETTINGS.items()):
            if name not in exclude:
                command = click.option(f"--{name.replace('_', '-')}", name, **_setting_option(setting))(command)
        return command

    return decorate


def _given(settings: dict) -> dict:
    """The method settings given on the command line or with one default (None: each method's own)."""
    return {name: value for name, value in settings.items() if value is not None}



@main.command("run")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="out", show_default=True,
              help="Output directory; the inputs' folder tree is mirrored inside it.")
@click.option("--target", default=contract.DEFAULT_TARGET, show_default=True,
              help="Class to explain: top1, topK (one map per rank, e.g. top3), a class index or a class name.")
@click.option("--reduce", type=click.Choice(contract.REDUCTIONS), default=contract.DEFAULT_REDUCTION, show_default=True,
              help="Channel reduction: max of |gradient| (PyTorch/cs231n recipes), signed sum (TensorFlow "
                   "recipe) or L2 norm.")
@click.option("--equalize/--no-equalize", default=True, show_default=True,
              help="Histogram-equalize the map shown in the heatmap and the flat overlay (the figure shows both).")
@click.option("--clip-percentile", type=click.FloatRange(0, 100), default=None,
              help="Clip the map at this upper percentile (e.g. 99) before normalizing.")
@click.option("--no-crop", is_flag=True,
              help="Resize the whole picture to the input size instead of resize + center crop.")
@click.option("--placement", type=click.Choice(contract.PLACEMENTS), default=contract.DEFAULT_PLACEMENT,
              show_default=True,
              help="Map back onto the crop window (crop) or stretch over the whole picture like the "
                   "ResNet-50 recipe (stretch).")
@click.option("--colormap", type=click.Choice(contract.COLORMAPS), default=contract.DEFAULT_COLORMAP,
              show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=None,
              help="Overlay opacity: at the map's highest values for peaks [default: 0.8], everywhere for flat "
                   "[default: 0.5].")
@click.option("--overlay", type=click.Choice(contract.OVERLAYS), default=contract.DEFAULT_OVERLAY, show_default=True,
              help="peaks: the map scaled to its 99th percentile, opacity growing with the value, so that only "
                   "where the map is high colours the picture; flat: the recipes' overlay, the heatmap's map at "
                   "one opacity.")
@click.option("--format", "formats", multiple=True, callback=_split_formats,
              help="Outputs among heatmap, overlay, figure, npy; repeatable or comma-separated "
                   "[default: heatmap,overlay,figure].")
@click.option("--batch-size", type=click.IntRange(min=1), default=contract.DEFAULT_BATCH_SIZE, show_default=True)
@click.option("--provider", default="auto", show_default=True,
              help=f"{', '.join(contract.PROVIDERS)}, or a comma-separated list of onnxruntime providers. auto: CUDA "
                   "when onnxruntime has it (onnxruntime-gpu), then WebGPU when its plugin (onnxruntime-ep-webgpu) "
                   "finds a GPU, then the CPU.")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="onnxruntime intra-op threads (default: onnxruntime decides).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout instead of text.")
@click.option("--method", type=click.Choice(contract.METHODS), default=contract.DEFAULT_METHOD, show_default=True,
              help="Attribution method; 'gradmap info' lists what a model supports.")
@_method_setting_options()
@click.option("--skip-existing", is_flag=True,
              help="Skip pictures whose requested outputs all exist (outputs are written atomically, so an "
                   "existing one is complete): resumes an interrupted run.")
@click.option("--engine", type=click.Choice(contract.ENGINES), default=contract.DEFAULT_ENGINE, show_default=True,
              help="local: this process; ray: Ray Data actors, one model loaded per actor, which read, explain "
                   "and write the pictures (pip install 'gradmap[ray]').")
@click.option("--address", default=None, metavar="auto|ray://HOST:PORT",
              help="--engine ray: the Ray cluster to use (default: start a local Ray with this machine's cores). "
                   "Workers need the model, inputs and --out at the same paths.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="--engine ray: actors (default: the cluster's CPUs divided by --threads, 1 thread each).")
@click.option("--to-parquet", "parquet_dir", type=click.Path(file_okay=False), default=None,
              help="--engine ray: instead of picture files, write one Parquet dataset to this new folder: path, "
                   "error, top-5, targets and the maps as an array column.")
def run_command(model_path: str, inputs: tuple[str, ...], out_dir: str, target: str, reduce: str, equalize: bool,
                clip_percentile: float | None, no_crop: bool, placement: str, colormap: str, alpha: float | None,
                overlay: str,
                formats: tuple[str, ...], batch_size: int, provider: str, threads: int | None,
                as_json: bool, method: str, skip_existing: bool, engine: str, address: str | None,
                workers: int | None, parquet_dir: str | None, **method_settings: object) -> None:
    """Compute gradient saliency maps of INPUT pictures (files, folders, globs) with MODEL.onnx.

    Prints the top-5 classes of every picture and writes the requested pictures and arrays under
    --out. Exits with 1 when some inputs failed (the others are still written), 2 on usage errors.
    """
    import json

    from gradmap.runtime import RenderOptions, TargetError
    from gradmap.runtime.jobs import EngineError, make_engine, run_job
    from gradmap.runtime.methods import MethodSpec, UnsupportedMethodError

    if engine == contract.ENGINE_RAY:
        _check_ray_options(skip_existing, parquet_dir)
    elif address or workers or parquet_dir:
        raise click.UsageError("--address, --workers and --to-parquet need --engine ray")
    model = _load_model(model_path, provider, threads)
    if model.target_notice:
        click.echo(f"note: {model.target_notice}", err=True)
    try:
        method_spec = MethodSpec(method, **_given(method_settings))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--method'") from e
    _unwind_on_sigterm()
    options = RenderOptions(equalize=equalize, placement=placement, colormap=colormap, alpha=alpha,
                            overlay=overlay)
    runner = make_engine(engine, model, address=address, workers=workers, threads=threads, provider=provider,
                         parquet_dir=parquet_dir)
    printer = _RunPrinter(as_json)
    from gradmap.runtime import perturbation  # long forward-only runs say how far they are

    reporting = perturbation.progress.set(_MaskProgress())
    try:
        summary = run_job(model, inputs, out_dir=out_dir, target=target, method=method_spec, reduce=reduce,
                          clip=None if clip_percentile is None else (0.0, clip_percentile), no_crop=no_crop,
                          formats=formats, render=options, batch_size=batch_size, engine=runner,
                          skip_existing=skip_existing, keep_records=as_json, reporter=printer)
    except TargetError as e:
        raise click.BadParameter(str(e), param_hint="'--target'") from e
    except UnsupportedMethodError as e:
        raise click.BadParameter(str(e), param_hint="'--method'") from e
    except EngineError as e:
        raise click.ClickException(str(e)) from e
    finally:
        perturbation.progress.reset(reporting)
        printer.close()
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    if skip_existing:
        click.echo(f"skipped {summary.skipped} of {summary.inputs} inputs whose outputs exist already", err=True)
    if summary.failed:
        click.echo(f"{summary.failed} of {summary.inputs} inputs failed", err=True)
    if summary.exit_code:
        sys.exit(summary.exit_code)


def _check_ray_options(skip_existing: bool, parquet_dir: str | None) -> None:
    """Usage errors of --engine ray, raised before anything starts; Ray itself must be installed."""
    from pathlib import Path

    try:
        from gradmap.distributed import import_ray

        import_ray()
    except ImportError as e:
        raise click.ClickException(str(e)) from e
    if parquet_dir is None:
        return
    source = click.get_current_context().get_parameter_source("formats")
    if source is not None and source.name == "COMMANDLINE":
        raise click.UsageError("--to-parquet writes the maps to Parquet instead of --format files; give one of them")
    if skip_existing:
        raise click.UsageError("--skip-existing resumes picture files, not a Parquet dataset")
    if Path(parquet_dir).exists() and any(Path(parquet_dir).iterdir()):
        raise click.UsageError(f"--to-parquet {parquet_dir}: the folder is not empty; give a new one")


class _MaskProgress:
    """Progress of occlusion, RISE and Score-CAM on stderr: a line every 5 s once a call has run 5 s."""

    def __init__(self) -> None:
        import time

        self.clock = time.monotonic
        self.started: dict[tuple[str, int], float] = {}
        self.shown = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        now = self.clock()
        started = self.started.setdefault((what, total), now)
        if now - started >= 5 and (now - self.shown >= 5 or done == total):
            self.shown = now
            click.echo(f"{what}: {done}/{total} ({now - started:.0f} s)", err=True)
        if done == total:
            self.started.pop((what, total), None)


def _unwind_on_sigterm() -> None:
    """For the rest of this command, SIGTERM (kill, a job scheduler's timeout) unwinds like Ctrl-C,
    so that an output being written removes its temporary file instead of leaving it behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    click.get_current_context().call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


class _RunPrinter:
    """What ``gradmap run`` prints as it goes: input errors, notes and failures on stderr, each picture's
    top-5 and files on stdout (not with --json: the summary lists them), a progress bar on stderr
    for more than a few pictures."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.bar = None

    def input_error(self, spec: str, reason: str) -> None:
        click.echo(f"error: {spec}: {reason}", err=True)

    def started(self, total: int) -> None:
        if total > _PROGRESS_THRESHOLD:
            self.bar = click.progressbar(length=total, label="saliency", file=sys.stderr)
            self.bar.__enter__()

    def picture_done(self, record: dict) -> None:
        for note in record["notes"]:
            click.echo(f"note: {record['path']}: {note}", err=True)
        if record["error"] is not None:
            click.echo(f"error: {record['path']}: {record['error']}", err=True)
        elif not self.as_json:
            _print_record(record)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _print_record(record: dict) -> None:
    click.echo(record["path"])
    for rank, p in enumerate(record["predictions"], 1):
        click.echo(f"  {rank}. {p['label']:<32} {p['index']:>6}  {p['probability']:.4f}")
    for m in record["maps"]:
        rank = f"top{m['rank']} " if m["rank"] is not None else ""
        gap = f" (completeness gap {m['completeness_gap']:.3g})" if m.get("completeness_gap") is not None else ""
        click.echo(f"  {m.get('method', contract.DEFAULT_METHOD)} map {rank}for {m['target']['label']} ({m['target']['index']}){gap}: "
                   + ", ".join(m["files"].values()))


@main.command("demo")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="gradmap-demo", show_default=True,
              help="Where to write the figures.")
@click.option("--threads", type=click.IntRange(min=0), default=None, help="onnxruntime intra-op threads.")
def demo_command(out_dir: str, threads: int | None) -> None:
    """Explain the bundled demo classifier's decisions on its bundled pictures, offline.

    The demo model is a small CNN trained on synthetic pictures of shapes among clutter
    (models/README.md). For each picture this writes the recipe's four-panel figure and a
    comparison of every method the model supports.
    """
    from pathlib import Path

    from gradmap.runtime import atomic_write
    from gradmap.runtime.compare import explain_with_methods, render_comparison
    from gradmap.runtime.methods import MethodSpec

    model_file = demo_model()
    if not model_file.is_file():
        raise click.ClickException(f"the demo model is missing ({model_file}): reinstall gradmap")
    model = _load_model(str(model_file), "cpu", threads)
    pictures = demo_pictures()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # fewer samples and steps than gradmap run, and the settings tuned for this model (SmoothGrad's
    # noise, chosen on validation images by models/evaluate_demo.py)
    settings = {**FIGURE_SETTINGS, **tuned_settings()}
    methods = [MethodSpec(name, **settings) for name in model.metadata.methods]
    click.echo(f"demo model: {model.metadata.source_model}; methods: {', '.join(m.name for m in methods)} "
               f"({', '.join(f'{k} {v:g}' for k, v in settings.items())})")
    for picture in pictures:
        shown, panels, caption = explain_with_methods(model, str(picture), methods)
        target = out / f"{Path(picture.name).stem}.methods.png"
        atomic_write(target, lambda f, img=render_comparison(shown, panels, caption=caption, panel_size=160):
                     img.save(f, format="PNG"))
        click.echo(f"{picture.name}: {caption} -> {target}")
    click.echo(f"wrote {len(pictures)} figures to {out.resolve()}")


@main.command("evaluate")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="A folder with images/, masks/ and optional labels.csv, or a .npz with images, masks, labels.")
@click.option("--randomized", "randomized_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The same network with its top layers re-initialized, exported by gradmap: runs the "
                   "model-parameter randomization sanity check.")
@click.option("--cascade", "cascade_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="The same network with more layers re-initialized (repeatable, shallowest first; Adebayo et "
                   "al.'s cascading randomization): rho against each is reported beside the check, labelled by "
                   "file name.")
@click.option("--method", "method_names", multiple=True, type=click.Choice(contract.METHODS),
              help="Evaluate only this method (repeatable); default: every method the model supports.")
@_method_setting_options(exclude=("seed",))
@click.option("--curve-steps", type=click.IntRange(min=1), default=64, show_default=True,
              help="Deletion/insertion steps.")
@click.option("--random-repeats", type=click.IntRange(min=1), default=2, show_default=True,
              help="Random pixel orders averaged for the reference curves.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N images.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Also report the pointing game counting maxima within this many input pixels of the object "
                   "(Zhang et al. use 15 px on PASCAL VOC / COCO pictures); 0: the strict form only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=None, help="onnxruntime intra-op threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the full results to this JSON file.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when a method fails the randomization check.")
def evaluate_command(model_path: str, data_path: str, randomized_path: str | None, cascade_paths: tuple[str, ...],
                     method_names: tuple[str, ...], curve_steps: int, random_repeats: int,
                     limit: int | None, tolerance: float, seed: int, threads: int | None, json_path: str | None,
                     strict: bool, **method_settings: object) -> None:
    """Measure map quality per method on images with object masks: pointing game, energy pointing
    game, deletion/insertion AUC against random pixel orders, and (with --randomized) the
    model-parameter randomization sanity check."""
    import json
    import os

    from gradmap.runtime import atomic_write
    from gradmap.runtime.evaluate import (EvaluationDataError, check_methods, evaluate, format_report,
                                          load_evaluation_data)
    from gradmap.runtime.methods import MethodSpec

    model = _load_model(model_path, "cpu", threads)
    randomized = _load_model(randomized_path, "cpu", threads) if randomized_path else None
    cascade = [(os.path.splitext(os.path.basename(path))[0], _load_model(path, "cpu", threads)) for path in cascade_paths]
    compared = [(randomized, randomized_path, "'--randomized'"),
                *((m, path, "'--cascade'") for (_, m), path in zip(cascade, cascade_paths))]
    names = list(dict.fromkeys(method_names)) or list(model.metadata.methods)
    try:
        specs = [MethodSpec(name, seed=seed, **_given(method_settings)) for name in names]
        check_methods(specs, [model, *(m for m, _, _ in compared)])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--method'") from e
    for m, path, hint in compared:
        if m is not None and m.metadata.labels != model.metadata.labels:
            raise click.BadParameter(f"{path} has other classes than {model_path}", param_hint=hint)
    if len({label for label, _ in cascade}) < len(cascade):
        raise click.BadParameter("two cascade models have the same file name; their columns would be confused",
                                 param_hint="'--cascade'")
    try:
        data = load_evaluation_data(data_path, model.metadata.preprocessing, model.metadata.labels, limit=limit)
    except EvaluationDataError as e:
        raise click.ClickException(str(e)) from e
    for note in data.notes:
        click.echo(f"note: {note}", err=True)
    results = evaluate(model, data, specs, randomized=randomized, cascade=cascade, steps=curve_steps,
                       random_repeats=random_repeats,
                       seed=seed, tolerance=tolerance, progress=lambda message: click.echo(message, err=True))
    results["model"] = model_path
    results["randomized_model"] = randomized_path
    results["cascade_models"] = list(cascade_paths)
    results["data"] = data_path
    click.echo(format_report(results))
    if json_path:
        atomic_write(json_path, lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))
        click.echo(f"wrote {json_path}")
    failed = [n for n, m in results["methods"].items() if m.get("sanity_check") == "FAILED"]
    if failed:
        click.echo(f"randomization sanity check failed: {', '.join(failed)}", err=True)
        if strict:
            sys.exit(1)


@main.command("info")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the information as one JSON document.")
def info_command(model_path: str, as_json: bool) -> None:
    """Show a gradmap model's metadata, inputs and outputs, opset and the available providers."""
    import json

    import onnxruntime

    from gradmap.runtime._lowering import CpuBlockError, cpu_block
    from gradmap.runtime.providers import plan_providers

    # a look at a model saves no session for it, and does not lower it: it says what a run would do
    model = _load_model(model_path, "cpu", 1, cache=False, cpu_block="off")
    auto = plan_providers("auto")  # what --provider auto would take here, and why
    meta = model.metadata
    try:
        block, reason = cpu_block()
    except CpuBlockError as e:
        raise click.ClickException(str(e)) from e
    if not meta.gradient:
        lowering = {"where": "none", "block": None, "reason": "a forward-only model: no gradient graph to lower"}
    elif meta.target == "portable":
        lowering = {"where": "at load" if block is not None else "off", "block": block, "reason": reason}
    else:
        lowering = {"where": "in the file (--target cpu)", "block": None, "reason": ""}
    info = {
        "path": model_path,
        "source_model": meta.source_model,
        "weights": meta.weights,
        "format_version": meta.format_version,
        "score": meta.score,
        "target": meta.target,
        "gradient": meta.gradient,
        "backprops": list(meta.backprops),
        "cam_layer": meta.cam_layer,
        "attention": dict(meta.attention) if meta.attention is not None else None,
        "methods": list(meta.methods),
        "other_methods": {m.name: list(meta.export_options(m)) for m in contract.METHOD_TABLE if m.name not in meta.methods},
        "preprocessing": meta.preprocessing.to_dict(),
        "num_classes": meta.num_classes,
        "labels_preview": list(meta.labels[:5]),
        "extra": dict(meta.extra),
        "ir_version": model.header.ir_version,
        "producer": f"{model.header.producer_name} {model.header.producer_version}".strip(),
        "opsets": model.opsets,
        "inputs": [{"name": t.name, "type": t.type, "shape": list(t.shape)} for t in model.inputs],
        "outputs": [{"name": t.name, "type": t.type, "shape": list(t.shape)} for t in model.outputs],
        "available_providers": onnxruntime.get_available_providers(),
        "cpu_lowering": lowering,
        "auto_provider": {"providers": list(auto.names), "why": auto.why},
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    p = meta.preprocessing
    click.echo(f"model:          {model_path}")
    click.echo(f"source:         {meta.source_model} (weights: {meta.weights})")
    click.echo(f"gradmap format: {meta.format_version}; target: {meta.target}; score: {meta.score}; "
               + (f"backprop: {', '.join(meta.backprops)}" if meta.gradient else
                  f"no gradient ({contract.NO_GRADIENT_OPTION}: the forward graph alone)")
               + (f"; CAM layer: {meta.cam_layer}" if meta.cam_layer else ""))
    if lowering["where"] == "none":
        click.echo(f"cpu lowering:   none ({lowering['reason']})")
    elif lowering["where"] == "at load":
        click.echo(f"cpu lowering:   at load, for onnxruntime's CPU provider, channel block {block} ({reason})")
    elif lowering["where"] == "off":
        click.echo(f"cpu lowering:   off ({reason}): the portable graph runs as written")
    else:
        click.echo(f"cpu lowering:   {lowering['where']}")
    if meta.attention is not None:
        a = meta.attention
        click.echo(f"attention:      {a['layers']} layers x {a['heads']} heads over {a['tokens']} tokens "
                   f"({a['prefix_tokens']} prefix + {a['grid'][0]}x{a['grid'][1]} patches; the classifier reads "
                   f"token{'s' if len(a['readout']) > 1 else ''} {', '.join(map(str, a['readout']))})")
    click.echo(f"methods:        {', '.join(meta.methods)}")
    if info["other_methods"]:
        click.echo("other methods:  " + "; ".join(f"{name} (export with {' '.join(options)})"
                                                  for name, options in info["other_methods"].items()))
    resize = f"resize {p.resize} ({p.resize_mode}, {p.interpolation}{'' if p.antialias else ', no antialiasing'})"
    click.echo(f"preprocessing:  {resize}, center crop {p.crop[0]}x{p.crop[1]}, {p.channel_order.upper()} "
               f"{p.value_range}, mean {list(p.mean)}, std {list(p.std)}")
    click.echo(f"classes:        {meta.num_classes} ({', '.join(meta.labels[:5])}{', ...' if meta.num_classes > 5 else ''})")
    click.echo(f"onnx:           IR {info['ir_version']}, opsets "
               + ", ".join(f"{d} {v}" for d, v in sorted(model.opsets.items())) + f", producer {info['producer'] or '?'}")
    for kind in ("inputs", "outputs"):
        click.echo(f"{kind}:")
        for t in info[kind]:
            click.echo(f"  {t['name']:<16} {t['type']:<16} {t['shape']}")
    click.echo("providers:      " + ", ".join(info["available_providers"]))
    click.echo(f"--provider auto: {', '.join(auto.names)} ({auto.why})")


@main.group("cache")
def cache_group() -> None:
    """onnxruntime's optimized graphs that later runs of a model load (the session cache).

    A model's second run on this machine saves one; runs after it load it instead of optimizing the
    model again. Kept under $GRADMAP_CACHE_DIR, else $XDG_CACHE_HOME/gradmap/onnxruntime, else
    ~/.cache/gradmap/onnxruntime; GRADMAP_CACHE_DIR=off turns the cache off.
    """


@cache_group.command("list")
def cache_list_command() -> None:
    """List the entries: the model file each was made from, and its size."""
    from gradmap.runtime._session_cache import cache_root, list_entries

    root = cache_root()
    if root is None:
        click.echo("the session cache is off (GRADMAP_CACHE_DIR)")
        return
    entries = list_entries(root)
    for entry in entries:
        state = "  (model file gone)" if entry["model"] and not entry["model_exists"] else ""
        click.echo(f"{entry['bytes'] / 1e6:9.1f} MB  {entry['model'] or '(model not recorded)'}{state}")
    total = sum(e["bytes"] for e in entries)
    click.echo(f"{len(entries)} entries, {total / 1e6:.1f} MB in {root}")


@cache_group.command("clear")
@click.option("--stale", is_flag=True, help="Only the entries whose model file is gone.")
def cache_clear_command(stale: bool) -> None:
    """Remove the entries (runs then optimize their models again)."""
    from gradmap.runtime._session_cache import cache_root, clear_entries

    root = cache_root()
    if root is None:
        click.echo("the session cache is off (GRADMAP_CACHE_DIR)")
        return
    removed, freed = clear_entries(root, stale_only=stale)
    click.echo(f"removed {removed} entries, {freed / 1e6:.1f} MB, from {root}")


@main.command("serve")
@click.argument("model_paths", metavar="MODEL.onnx...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="The URL name of each model, in order (repeatable); default: the file's stem.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 for every interface (in a container).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes, each with the models loaded and its own batching; one that dies is restarted.")
@click.option("--engine", type=click.Choice(contract.ENGINES), default=contract.DEFAULT_ENGINE, show_default=True,
              help="local: uvicorn workers on this machine; ray: a Ray Serve deployment (pip install "
                   "'gradmap[serve-ray]').")
@click.option("--address", default=None, metavar="auto|HOST:PORT",
              help="--engine ray: the Ray cluster (default: start a local Ray).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="--engine ray: replicas of the deployment.")
@click.option("--replica-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="--engine ray: CPUs each replica reserves (fractions allowed).")
@click.option("--provider", default="cpu", show_default=True, help=f"onnxruntime provider: {', '.join(contract.PROVIDERS)} (see gradmap run --help), or a "
                   "comma-separated list of onnxruntime providers.")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="onnxruntime intra-op threads per model (default: onnxruntime decides).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most pictures in one model run; 1 turns dynamic batching off.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long the first picture of a batch waits for others.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Pictures admitted and not yet answered, per process; more get 503 with Retry-After.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Largest request body, in MiB (413 above, refused before it is read whole).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Largest picture in pixels (413 above) [default: the runtime's decompression-bomb limit, "
                   "PIL's Image.MAX_IMAGE_PIXELS].")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds from a request's arrival to its answer (504 after).")
@click.option("--read-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds for a request's headers, and for its body, to arrive (408 after).")
@click.option("--max-instances", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most pictures in one request.")
@click.option("--max-top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Largest K of a topK target.")
@click.option("--max-passes", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most model runs one picture may take (samples, steps, masks, occlusion windows, Score-CAM "
                   "channels); a request over it gets a 400 saying what to send instead.")
@click.option("--max-connections", type=click.IntRange(min=1), default=128, show_default=True,
              help="Open connections per process (503 above).")
@click.option("--image-formats", default="JPEG,PNG,WEBP", show_default=True,
              help="Picture formats accepted (PIL names, comma-separated); others get 415.")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds SIGTERM waits for the requests in flight [default: --request-timeout + 5].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve_command(model_paths: tuple[str, ...], names: tuple[str, ...], host: str, port: int, processes: int,
                  engine: str, address: str | None, replicas: int, replica_cpus: float, provider: str,
                  threads: int | None, max_batch: int, max_wait_ms: float, max_queue: int, max_body_mb: float,
                  max_pixels: int | None, request_timeout: float, read_timeout: float, max_instances: int,
                  max_top: int, max_passes: int, max_connections: int, image_formats: str,
                  drain_timeout: float | None, log_level: str) -> None:
    """Serve saliency maps over HTTP: KServe V1 (:predict, :explain), the Open Inference Protocol
    (/v2/...) and POST /explain/NAME, with dynamic batching, limits and Prometheus /metrics.

    Listens on 127.0.0.1 unless --host says otherwise; SIGTERM drains the requests in flight.
    See docs/serve.md for the endpoints and their request and response shapes.
    """
    import logging

    try:
        from gradmap.serve.config import Limits, ServeConfig, model_names
    except ImportError as e:
        raise click.ClickException(f"'gradmap serve' needs the [serve] extra ({e.name or e}): "
                                   "pip install 'gradmap[serve]'") from e
    ctx = click.get_current_context()
    if engine == contract.ENGINE_LOCAL and (address or ctx.get_parameter_source("replicas").name == "COMMANDLINE"
                              or ctx.get_parameter_source("replica_cpus").name == "COMMANDLINE"):
        raise click.UsageError("--address, --replicas and --replica-cpus need --engine ray")
    if engine == contract.ENGINE_RAY and ctx.get_parameter_source("processes").name == "COMMANDLINE":
        raise click.UsageError("--processes is for --engine local; Ray Serve runs --replicas")
    try:
        limits_kw = {} if max_pixels is None else {"max_pixels": max_pixels}
        limits = Limits(max_body_bytes=int(max_body_mb * 2**20), request_timeout=request_timeout,
                        read_timeout=read_timeout, max_batch=max_batch, max_wait=max_wait_ms / 1000,
                        max_queue=max_queue, max_instances=max_instances, max_top=max_top, max_passes=max_passes,
                        max_connections=max_connections,
                        image_formats=tuple(f.strip() for f in image_formats.split(",") if f.strip()), **limits_kw)
        config = ServeConfig(model_names(list(model_paths), names), limits, provider=provider, threads=threads)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def listening(bound: int) -> None:
        workers = (f"{replicas} Ray Serve replica{'s' if replicas > 1 else ''}" if engine == contract.ENGINE_RAY else
                   f"{processes} process{'es' if processes > 1 else ''}")
        click.echo(f"serving {', '.join(config.models)} on http://{host}:{bound} ({workers}; SIGTERM or Ctrl-C "
                   "drains and stops)", err=True)

    if engine == contract.ENGINE_RAY:
        try:
            from gradmap.serve.ray_serve import RayServeError, run_ray_serve
        except ImportError as e:
            raise click.ClickException(str(e)) from e
        try:
            run_ray_serve(config, host=host, port=port, address=address, replicas=replicas, replica_cpus=replica_cpus,
                          on_listening=listening)
        except (RayServeError, ImportError) as e:
            raise click.ClickException(str(e)) from e
        click.echo("drained and stopped", err=True)
        return
    from gradmap.serve.server import ServeError, serve

    try:
        serve(config, host, port, processes=processes, drain_timeout=drain_timeout, log_level=log_level,
              on_listening=listening)
    except ServeError as e:
        raise click.ClickException(str(e)) from e
    click.echo("drained and stopped", err=True)


@main.command("web")
@click.argument("model_path", metavar="[MODEL.onnx]", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="gradmap-site", show_default=True,
              help="Where to write the site; its own files there are replaced.")
@click.option("--ort-dist", type=click.Path(exists=True, file_okay=False), default=None,
              help="A local copy of onnxruntime-web's dist/ folder (npm install onnxruntime-web), copied into the "
                   "site so that it works offline; default: the page loads the pinned version from a public CDN.")
@click.option("--example", "examples", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A picture to offer on the page (repeatable); the demo model brings its own.")
@click.option("--serve", is_flag=True, help="Then serve the site on 127.0.0.1 (with the headers threaded "
                                            "WebAssembly needs) until Ctrl-C.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port for --serve.")
def web_command(model_path: str | None, out_dir: str, ort_dist: str | None, examples: tuple[str, ...], serve: bool,
                port: int) -> None:
    """Write a static site that explains pictures in the browser with MODEL.onnx (default: the bundled
    demo model), computing maps with onnxruntime-web: no server-side code, no Python in the browser."""
    from gradmap.runtime import GradmapModelError
    from gradmap.web import SiteError, build_site, make_server

    settings = {}
    if model_path is None:
        model_path = str(demo_model())
        if not examples:
            examples = tuple(str(p) for p in demo_pictures())
        settings = tuned_settings()
    try:
        config = build_site(model_path, out_dir, ort_dist=ort_dist, examples=examples, settings=settings)
    except (SiteError, GradmapModelError) as e:
        raise click.ClickException(str(e)) from e
    source = "ort/ (local copy)" if ort_dist else config["ort"]["base"]
    click.echo(f"wrote {out_dir}: {config['source_model']}, methods {', '.join(config['methods'])}; "
               f"onnxruntime-web {config['ort']['version']} from {source}")
    if not ort_dist:
        click.echo("note: the page needs the network for onnxruntime-web; --ort-dist DIR (npm install "
                   "onnxruntime-web, DIR = node_modules/onnxruntime-web/dist) makes the site work offline", err=True)
    if not serve:
        click.echo("serve it over HTTP (browsers do not run it from file://): add --serve")
        return
    server = make_server(out_dir, port)
    click.echo(f"serving on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
