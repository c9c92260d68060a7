"""gradmap's command line. Thin: parses options, calls the library, prints.

Heavy modules (torch for ``export``, onnxruntime for ``run``) are imported inside the command
that needs them so that ``gradmap --help`` starts fast and the runtime never touches torch.
"""

from __future__ import annotations

import sys

import click

from gradmap import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradmap")
def main() -> None:
    """Gradient saliency maps for image classifiers, exported once and run without PyTorch."""


@main.command("export")
@click.argument("model_name", metavar="MODEL")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, writable=True), required=True,
              help="Where to write the ONNX model.")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="torchvision weights name (e.g. DEFAULT, IMAGENET1K_V2), 'none' for seeded random "
                   "weights, or a path to a state-dict file.")
@click.option("--score", type=click.Choice(["logit", "probability", "log_probability"]), default="logit",
              show_default=True, help="What the gradient differentiates.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random weights (--weights none).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset of the exported model.")
@click.option("--backprop", "backprops", multiple=True, type=click.Choice(["guided", "deconvnet"]),
              help="Also emit the gradient under this ReLU rule (repeatable), sharing the forward pass: "
                   "guided backpropagation or deconvnet (Springenberg et al. 2015).")
@click.option("--cam-layer", default=None, metavar="NAME|auto",
              help="Add a feature map and its gradient as outputs for Grad-CAM: 'auto' (the last feature map "
                   "before global pooling), a torch module name (e.g. layer4) or an ONNX value name.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against torch autograd (not recommended).")
def export_command(model_name: str, output: str, weights: str, score: str, seed: int, opset: int,
                   backprops: tuple[str, ...], cam_layer: str | None, no_verify: bool) -> None:
    """Export a torchvision classifier MODEL to an ONNX model with an input-gradient output."""
    try:
        from gradmap.export import ExportError, export_torchvision
    except ImportError as e:  # torch or onnx missing
        raise click.ClickException(
            f"'gradmap export' needs PyTorch and ONNX ({e.name or e}): pip install 'gradmap[export]'"
        ) from e
    try:
        report = export_torchvision(model_name, output, weights=weights, score=score, seed=seed,
                                    opset=opset, verify=not no_verify, backprops=("vanilla", *backprops),
                                    cam_layer=cam_layer)
    except ExportError as e:
        raise click.ClickException(str(e)) from e
    click.echo(report.summary())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
