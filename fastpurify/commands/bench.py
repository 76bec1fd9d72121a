"""``fastpurify bench anp``: ANP iterations per second of fastpurify, the reference and the
reference under torch.compile, in one process on one device; prints a table, writes JSON.

    fastpurify bench anp                       # the issue's setting: CIFAR ResNet-18, batch 128, 500 images
    fastpurify bench anp --smoke               # small CPU sizes (CI)
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
from pathlib import Path

SMOKE = dict(arch="small_cnn", batch_size=32, num_images=64, image_size=16, warmup=1, iterations=3, repeats=3)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="throughput benchmarks (fastpurify vs reference vs torch.compile)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["anp"], help="what to measure")
    p.add_argument("--arch", default="cifar_resnet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=500, help="clean images (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all that "
                   "apply to the device)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iterations", type=int, default=10, help="iterations per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks (the median is reported)")
    p.add_argument("--end-to-end", type=int, default=None,
                   help="also time one fastpurify.anp call of N iterations (default: 2000 on CUDA, 0 on CPU)")
    p.add_argument("--precision-check", type=int, default=None,
                   help="also count neurons bf16 moves across threshold 0.2 after N iterations (default: 200 on "
                        "CUDA, 0 on CPU)")
    p.add_argument("--smoke", action="store_true", help="small sizes for a quick CPU check")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/anp-<device>-<date>.json)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..benchmarks.anp import format_table, run_anp_benchmark
    from ..engines.runtime import resolve_device
    from ..files import write_json

    device = resolve_device(args.device)
    kw = dict(arch=args.arch, batch_size=args.batch_size, num_images=args.images, image_size=args.image_size,
              warmup=args.warmup, iterations=args.iterations, repeats=args.repeats)
    if args.smoke:
        kw.update(SMOKE)
    on_cuda = device.type == "cuda"
    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else None
    e2e = args.end_to_end if args.end_to_end is not None else (2000 if on_cuda and not args.smoke else 0)
    check = args.precision_check if args.precision_check is not None else (200 if on_cuda and not args.smoke else 0)
    print(f"fastpurify bench anp on {device}:")
    result = run_anp_benchmark(device=device, channels=args.channels, variants=variants, end_to_end_iterations=e2e,
                               precision_check_iterations=check, **kw)
    print(format_table(result))
    out = Path(args.out) if args.out else Path("bench/results") / (
        f"anp-{_slug(result['environment']['device'])}-{dt.date.today().isoformat()}.json")
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "device"
