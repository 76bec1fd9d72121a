"""Command-line options shared by the purification commands (``anp``, ``pbe``)."""

from __future__ import annotations

import argparse


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The suspect checkpoint and how to read it."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="checkpoint: .safetensors, or .pt/.pth of weights")
    g.add_argument("--arch", default=None, help="architecture (default: from the checkpoint's metadata): "
                   "cifar_resnet18 | preact_resnet18 | small_cnn | torchvision:<name>")
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--in-channels", type=int, default=None)
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow a checkpoint that holds pickled Python code (only if you trust its author)")


def add_trigger_options(g: argparse._ArgumentGroup) -> None:
    """The trigger used to measure the ASR."""
    g.add_argument("--attack", default=None,
                   help="trigger for ASR: badnets | blend | sig | wanet | none (default: the checkpoint's)")
    g.add_argument("--target", type=int, default=None)
    g.add_argument("--mode", default=None, choices=["all2one", "all2all"])


def add_augment_options(g: argparse._ArgumentGroup) -> None:
    """The crop + flip augmentation of the batches."""
    g.add_argument("--no-augment", action="store_true")
    g.add_argument("--padding", type=int, default=4)
    g.add_argument("--no-flip", action="store_true")


def add_engine_and_output_options(p: argparse.ArgumentParser, out: str) -> None:
    """Which engine runs where and how, and where the results go."""
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=["fast", "reference"], default="fast")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    g.add_argument("--no-cuda-graph", action="store_true")
    g.add_argument("--no-channels-last", action="store_true")
    g.add_argument("--no-tf32", action="store_true")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-progress", action="store_true")


def plotting_enabled(args: argparse.Namespace) -> bool:
    """Whether to draw the figures: not with ``--no-plot``, nor without matplotlib (said once)."""
    from ..plots import matplotlib_missing

    if args.no_plot:
        return False
    missing = matplotlib_missing()
    if missing:
        print(f"figures skipped: {missing}")
    return not missing
