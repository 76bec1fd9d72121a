"""Command-line options shared by the purification commands (``anp``, ``pbe``)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from ..validation import InputError, check_auto_or_fraction


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The suspect checkpoint and how to read it."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="checkpoint: .safetensors, or .pt/.pth of weights")
    g.add_argument("--arch", default=None, help="architecture (default: from the checkpoint's metadata): "
                   "cifar_resnet18 | preact_resnet18 | small_cnn | torchvision:<name> | timm:<name>")
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


def add_augment_options(g: argparse._ArgumentGroup, auto: bool = False) -> None:
    """The crop + flip augmentation of the batches; ``auto``: padding and flips chosen from the
    model and the data by default (``--padding auto``, ``--flip auto``, see
    :mod:`fastpurify.calibration`), ``args.flip`` one of "auto", "on", "off"."""
    g.add_argument("--no-augment", action="store_true")
    if not auto:
        g.add_argument("--padding", type=int, default=4)
        g.add_argument("--no-flip", action="store_true")
        return
    g.add_argument("--padding", default="auto", help="random-crop padding in pixels, or 'auto': an eighth of the "
                   "image side, 4 at 32 px (default: %(default)s)")
    g.add_argument("--flip", choices=["auto", "on", "off"], default="auto",
                   help="random horizontal flips; auto: only when the model keeps 90%% of its accuracy on flipped "
                        "images (natural photographs yes, digits or text no) (default: %(default)s)")
    g.add_argument("--no-flip", action="store_const", dest="flip", const="off", help="the same as --flip off")


def parse_padding(text: str, name: str = "--padding") -> int | str:
    """``auto`` or a whole number of pixels >= 0."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise InputError(f"{name} must be a whole number of pixels >= 0 or 'auto', got {text!r}")
    return value


def parse_auto_or_fraction(text: str, name: str, what: str = "a number") -> float | str:
    """``auto`` or a number in (0, 1] (:func:`fastpurify.validation.check_auto_or_fraction`)."""
    try:
        value = float(text)
    except ValueError:
        value = text
    check_auto_or_fraction(value, name, what)
    return value


def parse_anp_eps(text: str, name: str = "--eps") -> float | str:
    """ANP's neuron-perturbation bound: ``auto`` (:mod:`fastpurify.anp_eps`) or a number in (0, 1]."""
    return parse_auto_or_fraction(text, name)


def parse_patch_area(text: str, name: str) -> float | str:
    """A reconstructed patch's share of the pixels: ``auto`` (read from the model) or a number in (0, 1]."""
    return parse_auto_or_fraction(text, name, "a share of the pixels")


FLIP = {"auto": "auto", "on": True, "off": False}


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


def add_large_model_options(p: argparse.ArgumentParser, masks: bool) -> None:
    """Which neurons ANP masks, memory-bounded runs, and the process group under torchrun."""
    g = p.add_argument_group("large models (fast engine)")
    if masks:
        g.add_argument("--mask-layers", default="batchnorm,layernorm,groupnorm",
                       help="comma-separated layer kinds whose neurons are masked: batchnorm, layernorm, groupnorm, "
                            "conv_linear (the paper's Eq. 3 for networks without normalisation) (default: %(default)s)")
    g.add_argument("--micro-batch", default=None,
                   help="process every batch as micro-batches of N images with accumulated gradients (N divides "
                        "the batch; 'auto': the largest that fits in free GPU memory)")
    g.add_argument("--checkpoint", action="store_true",
                   help="activation checkpointing: recompute each block's activations in the backward pass")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="under torchrun: seconds a collective waits for the other ranks before failing "
                        "(default: %(default)s)")


def micro_batch_option(args: argparse.Namespace) -> int | str | None:
    """``--micro-batch`` as the engines take it, checked for the engine chosen."""
    value = args.micro_batch
    if value is not None and value != "auto":
        try:
            value = int(value)
        except ValueError:
            raise InputError(f"--micro-batch must be a positive integer or 'auto', got {value!r}") from None
    if args.engine == "reference" and (value is not None or args.checkpoint):
        raise InputError("--micro-batch and --checkpoint need the fast engine (--engine fast)")
    return value


def peak_text(engine: dict) -> str:
    """"; peak memory X MiB (kind)" when the engine measured it, else ""."""
    if engine.get("peak_memory_bytes") is None:
        return ""
    return f"; peak memory {engine['peak_memory_bytes'] / 2**20:.0f} MiB ({engine['peak_memory_kind']})"


@contextlib.contextmanager
def process_group(args: argparse.Namespace) -> Iterator[None]:
    """Under torchrun: the default process group for the command (destroyed after); else nothing."""
    from .. import distributed as D

    owned = D.init_from_environment(args.dist_timeout)
    if D.world_size() > 1 and args.engine == "reference":
        if owned:
            D.shutdown()
        raise InputError("the reference engine runs in one process; run it without torchrun, or use --engine fast")
    try:
        yield
    finally:
        if owned:
            D.shutdown()


def plotting_enabled(args: argparse.Namespace) -> bool:
    """Whether to draw the figures: not with ``--no-plot``, nor without matplotlib (said once)."""
    from ..plots import matplotlib_missing

    if args.no_plot:
        return False
    missing = matplotlib_missing()
    if missing:
        print(f"figures skipped: {missing}")
    return not missing
