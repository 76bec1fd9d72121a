"""``fastpurify bench anp|pgd|pbe|bn``: fastpurify against the reference and the reference under
torch.compile, in one process on one device and the same data; prints a table, writes JSON
(default: bench/results/<what>-<device>-<date>.json, with the device, library versions and date).

    fastpurify bench anp             # ANP iterations/s: CIFAR ResNet-18, batch 128, 500 images
    fastpurify bench pgd             # PGD-10 images/s: PreAct-ResNet-18, CIFAR shapes, chunks of 512
    fastpurify bench pbe             # one PBE round on 2,500 images, a scoring pass, and on CUDA the
                                     # full progressive run on 50,000 images (reference vs fast)
    fastpurify bench pgd --smoke     # small CPU sizes (CI); likewise for anp and pbe
    fastpurify bench anp --model vit_b_16 --image-size 224 --batch-size 64 --micro-batch 16
                                     # large models: ViT-B/16 (LayerNorm neurons), ResNet-50, ...
    fastpurify bench bn              # the fused BatchNorm vs the PyTorch composition, torch.compile,
                                     # PyTorch's BatchNorm and a copy, at CIFAR ResNet-18's shapes
    fastpurify bench bn --shapes resnet50 --layouts nhwc --budget 120
                                     # other shapes (presets or 128x64x112x112,...), a time budget
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Per benchmark: the defaults of the shared options, then the --smoke sizes.
DEFAULTS = {
    "anp": dict(arch="cifar_resnet18", batch_size=128, images=500, warmup=3, iterations=10, repeats=5),
    "pgd": dict(arch="preact_resnet18", batch_size=512, images=2048, warmup=3, iterations=4, repeats=5, steps=10),
    "pbe": dict(arch="preact_resnet18", batch_size=128, images=2500, warmup=1, iterations=1, repeats=3,
                adv_epochs=3, clean_epochs=17, full_images=50000),
    "bn": dict(shapes="cifar_resnet18", warmup=5, repeats=30),
}
OURS = ("cifar_resnet18", "preact_resnet18", "small_cnn")
SMOKE = {
    "anp": dict(arch="small_cnn", batch_size=32, images=64, image_size=16, warmup=1, iterations=3, repeats=3),
    "pgd": dict(arch="small_cnn", batch_size=16, images=32, image_size=16, warmup=1, iterations=2, repeats=3,
                steps=3),
    "pbe": dict(arch="small_cnn", batch_size=16, images=32, image_size=16, warmup=1, iterations=1, repeats=2,
                adv_epochs=1, clean_epochs=1, score_images=64, full_images=64),
    "bn": dict(shapes="smoke", warmup=1, repeats=3),
}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="throughput benchmarks (fastpurify vs reference vs torch.compile)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=sorted(DEFAULTS), help="what to measure")
    p.add_argument("--arch", "--model", dest="arch", default=None,
                   help="model: ours (cifar_resnet18, preact_resnet18, small_cnn) or a torchvision classifier by name "
                        "(resnet50, vit_b_16, swin_t, convnext_tiny; or torchvision:<name>), or timm:<name> "
                        "(default: cifar_resnet18 for anp, preact_resnet18 otherwise)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="ANP batch (128), PGD chunk (512), PBE training batch (128)")
    p.add_argument("--images", type=int, default=None,
                   help="clean images (anp: 500), images cycled through in chunks (pgd: 2048), the extra set of "
                        "the timed round (pbe: 2500)")
    p.add_argument("--image-size", type=int, default=None, help="image side (default: 32)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all that "
                   "apply to the device)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (anp 3, pgd 3, pbe 1, bn 5)")
    p.add_argument("--iterations", type=int, default=None, help="steps per timed block (anp 10, pgd 4; pbe: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks, the median is reported (5; pbe 3; bn: 30 "
                   "single calls)")
    p.add_argument("--end-to-end", type=int, default=None,
                   help="anp: also time one fastpurify.anp call of N iterations (default: 2000 on CUDA, 0 on CPU); "
                        "pgd: also time fastpurify.pgd vs the reference on N images (default: 10000 on CUDA, 0 on "
                        "CPU)")
    g = p.add_argument_group("anp")
    g.add_argument("--precision-check", type=int, default=None,
                   help="also count neurons bf16 moves across threshold 0.2 after N iterations (default: 200 on "
                        "CUDA, 0 on CPU)")
    g.add_argument("--mask-layers", default="batchnorm,layernorm,groupnorm",
                   help="layer kinds whose neurons are masked: batchnorm, layernorm, groupnorm, conv_linear "
                        "(default: %(default)s)")
    g.add_argument("--micro-batch", type=int, default=None, help="fast variants: micro-batches of N images")
    g.add_argument("--checkpoint", action="store_true", help="fast variants: activation checkpointing")
    g = p.add_argument_group("pgd")
    g.add_argument("--steps", type=int, default=None, help="PGD steps (default: 10)")
    g.add_argument("--no-random-start", action="store_true", help="start PGD at the images")
    g = p.add_argument_group("pbe")
    g.add_argument("--adv-epochs", type=int, default=None, help="epochs on PGD examples per round (default: 3)")
    g.add_argument("--clean-epochs", type=int, default=None, help="clean epochs per round (default: 17)")
    g.add_argument("--pgd-batch-size", type=int, default=None,
                   help="the fast engine's PGD chunk in the timed round (default: the engine's, 512 on CUDA and "
                        "the batch size on a CPU)")
    g.add_argument("--score-images", type=int, default=None,
                   help="images of the timed scoring pass (default: 50000 on CUDA, 512 on CPU)")
    g.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the full progressive PBE, reference vs fast end to end (default: on CUDA "
                        "without --smoke; on CPU it takes hours)")
    g.add_argument("--full-images", type=int, default=None, help="training images of the full run (default: 50000)")
    g = p.add_argument_group("bn (variants: fused, composition, compile, cudnn, copy)")
    g.add_argument("--shapes", default=None,
                   help="N x C x H x W shapes, comma-separated (256x64x32x32,...), or a preset: cifar_resnet18 "
                        "(default), resnet50 (224px, batch 128), smoke")
    g.add_argument("--groups", type=int, default=2, help="groups of the batch, each with its own statistics "
                   "(default: 2, ANP's clean and perturbed halves)")
    g.add_argument("--layouts", default="nchw,nhwc",
                   help="nchw (contiguous), nhwc (channels_last) (default: %(default)s)")
    g.add_argument("--modes", default="forward,forward+backward", help="default: %(default)s")
    g.add_argument("--compile-dynamic", action="store_true",
                   help="one dynamic torch.compile per layout and mode instead of one per shape (less compile time)")
    g.add_argument("--budget", type=float, default=None,
                   help="seconds: start no measurement after this; the rest is listed as skipped (default: none)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)")
    p.add_argument("--smoke", action="store_true", help="small sizes for a quick CPU check")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<what>-<device>-<date>.json)")
    return p


def _settings(args: argparse.Namespace) -> dict:
    """The sizes: given on the command line, else the --smoke size, else the default."""
    s = dict(DEFAULTS[args.what], image_size=32)
    s.update((k, v) for k, v in SMOKE[args.what].items() if args.smoke)
    for key in ("arch", "batch_size", "images", "image_size", "warmup", "iterations", "repeats", "steps",
                "adv_epochs", "clean_epochs", "score_images", "full_images"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if ":" not in s["arch"] and s["arch"] not in OURS:
        s["arch"] = f"torchvision:{s['arch']}"  # --model resnet50 | vit_b_16 | ...
    return s


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmarks import anp, pbe, pgd
    from ..benchmarks.common import result_path
    from ..engines.runtime import resolve_device
    from ..files import write_json
    from ..validation import check_positive_int

    device = resolve_device(args.device)
    if args.threads is not None:
        check_positive_int(args.threads, "--threads")
        torch.set_num_threads(args.threads)
    if args.what == "bn":
        return _run_bn(args, device)
    s = _settings(args)
    full_size = device.type == "cuda" and not args.smoke
    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else None
    kw = dict(arch=s["arch"], batch_size=s["batch_size"], num_images=s["images"], image_size=s["image_size"],
              channels=args.channels, device=device, variants=variants, warmup=s["warmup"], repeats=s["repeats"])
    print(f"fastpurify bench {args.what} on {device}:")
    if args.what == "anp":
        module = anp
        result = anp.run_anp_benchmark(
            iterations=s["iterations"], **kw,
            end_to_end_iterations=args.end_to_end if args.end_to_end is not None else (2000 if full_size else 0),
            precision_check_iterations=args.precision_check if args.precision_check is not None else (
                200 if full_size else 0),
            mask_layers=args.mask_layers, micro_batch=args.micro_batch, checkpoint=args.checkpoint)
    elif args.what == "pgd":
        module = pgd
        result = pgd.run_pgd_benchmark(
            iterations=s["iterations"], steps=s["steps"], random_start=not args.no_random_start,
            end_to_end_images=args.end_to_end if args.end_to_end is not None else (10000 if full_size else 0), **kw)
    else:
        module = pbe
        full = args.full if args.full is not None else full_size
        score = s.get("score_images", 50000 if device.type == "cuda" else 512)
        result = pbe.run_pbe_benchmark(adv_epochs=s["adv_epochs"], clean_epochs=s["clean_epochs"], score_images=score,
                                       pgd_batch_size=args.pgd_batch_size,
                                       full_images=s["full_images"] if full else 0, **kw)
    print(module.format_table(result))
    out = Path(args.out) if args.out else result_path(args.what, result["environment"])
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def _run_bn(args: argparse.Namespace, device) -> int:
    """``fastpurify bench bn``: the JSON is rewritten after every row, so a run cut short keeps
    what it measured. On a CPU one thread unless --threads says otherwise."""
    import time

    from ..benchmarks import batch_norm
    from ..benchmarks.common import result_path
    from ..files import write_json
    from ..validation import InputError

    s = dict(DEFAULTS["bn"], **(SMOKE["bn"] if args.smoke else {}))
    s.update((k, getattr(args, k)) for k in ("shapes", "warmup", "repeats") if getattr(args, k) is not None)
    if args.budget is not None and not args.budget > 0:
        raise InputError(f"--budget must be a positive number of seconds, got {args.budget}")
    deadline = None if args.budget is None else time.monotonic() + args.budget
    out = Path(args.out) if args.out else None

    def save(row, result):
        write_json(out or result_path("bn", result["environment"]), result)

    print(f"fastpurify bench bn on {device}:")
    result = batch_norm.run_bn_benchmark(
        shapes=s["shapes"], groups=args.groups, layouts=args.layouts, modes=args.modes,
        variants=tuple(v.strip() for v in args.variants.split(",")) if args.variants else None, device=device,
        warmup=s["warmup"], repeats=s["repeats"], compile_dynamic=args.compile_dynamic, deadline=deadline,
        threads=args.threads or (1 if device.type != "cuda" else None), on_row=save)
    print(batch_norm.format_table(result))
    out = out or result_path("bn", result["environment"])
    write_json(out, result)
    print(f"wrote {out}")
    return 0
