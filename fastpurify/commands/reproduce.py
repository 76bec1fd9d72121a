"""``fastpurify reproduce anp|pbe``: the papers' CIFAR-10 tables, reproduced side by side.

    fastpurify reproduce anp --data cifar10-jpeg --attacks badnets,blend --seeds 3 --out runs/anp
    fastpurify reproduce pbe --data cifar10-jpeg --attacks badnets,blend,sig,wanet --budget 300
    fastpurify reproduce anp --arch small_cnn --train-images 10000 --rate 0.1 --epochs 12 --iterations 300   # CPU-sized

For each attack and seed it trains the backdoored subject the way the paper did (cached: a second
run reuses it), runs the defense with the paper's settings, and writes table.md, table.json and
table.png (ACC / ASR before and after, mean ± std over seeds, the time of each defense) beside the
papers' values when you give them (--paper-numbers).
"""

from __future__ import annotations

import argparse

from ..validation import InputError
from .anp import ORDERS


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("reproduce", help="the papers' CIFAR-10 tables: backdoored subjects, the defense, a table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("defense", choices=["anp", "pbe"])
    g = p.add_argument_group("subjects")
    g.add_argument("--data", default="cifar10-jpeg",
                   help="cifar10-jpeg[:PATH] (default; CIFAR-10 (JPEG copy)) | imagefolder:PATH | cifar10[:DIR] | "
                        "digits | any --data source with a training split")
    g.add_argument("--attacks", default="badnets,blend", help="comma-separated: badnets, blend, sig, wanet, and none "
                   "(a clean control: the same training without poison; no ASR) (default: %(default)s)")
    g.add_argument("--seeds", type=int, default=1, help="subjects per attack, seeds 0..N-1 (default: %(default)s)")
    g.add_argument("--arch", default=None, help="default: the paper's (anp: cifar_resnet18, pbe: preact_resnet18)")
    g.add_argument("--rate", type=float, default=None, help="poison rate (default: anp 0.05, pbe 0.1)")
    g.add_argument("--epochs", type=int, default=None, help="subject training epochs (default: 30 on CUDA, 15 on CPU)")
    g.add_argument("--batch-size", type=int, default=None, help="subject training batch (default: 512 CUDA, 128 CPU)")
    g.add_argument("--lr", type=float, default=None, help="subject training peak lr (default: 0.2 CUDA, 0.05 CPU)")
    g.add_argument("--budget", type=float, default=None,
                   help="seconds for training the subjects not cached yet: their epochs are capped to fit")
    g.add_argument("--train-images", type=int, default=None, help="a random subset of the training split")
    g.add_argument("--test-images", type=int, default=None, help="a random subset of the test split")
    g.add_argument("--clean-images", type=int, default=None,
                   help="the defender's clean images (default: anp 1 %%, pbe 5 %% of the training split)")
    g.add_argument("--subject-cache", default=None,
                   help="folder of cached subjects (default: $FASTPURIFY_CACHE/subjects or ~/.cache/fastpurify/subjects)")
    g = p.add_argument_group("ANP")
    g.add_argument("--iterations", type=int, default=None, help="mask iterations (default: the paper's 2000)")
    g.add_argument("--anp-eps", default=None,
                   help="the neuron perturbation's bound, in (0, 1], or 'auto': read from each subject "
                        "(fastpurify.anp_eps) (default: the paper's 0.4)")
    g.add_argument("--threshold", type=float, default=None, help="prune masks <= T (default: 0.2)")
    g.add_argument("--max-drop", type=float, default=None,
                   help="the clean-data rule's allowed clean-accuracy drop, a fraction (default: 0.02)")
    g.add_argument("--anp-seeds", type=int, default=None,
                   help="a seed ensemble of K mask sets per subject, pruned by their mean mask (default: 1)")
    g.add_argument("--select-order", choices=ORDERS, default=None,
                   help="the auto rule's ranking: masks (ANP's) or patch (fastpurify's own: ANP's neurons ordered by a "
                        "trigger reconstructed toward the suspected target; fastpurify.patch_order) (default: masks)")
    g.add_argument("--select-order-area", default=None,
                   help="with --select-order patch: the order's patch, a share of the pixels in (0, 1], or auto: read "
                        "from each subject (the largest of 1-8 %% at which no other class's patch reaches 0.4 of the "
                        "images) (default: the auto rule's 0.01)")
    g.add_argument("--select-correct-stats", action="store_true",
                   help="the auto rule corrects the pruned model's BatchNorm statistics for the pruning where its "
                        "probe still finds no backdoor on the corrected model (fastpurify's own, opt-in)")
    g.add_argument("--select-hold", type=int, default=None, metavar="N",
                   help="the auto rule stops only where its probe's share stays under the bar over that candidate "
                        "and the N after it (fastpurify's own, opt-in) (default: 0)")
    g.add_argument("--no-auto-rule", action="store_true",
                   help="skip the trigger-free auto pruning column (it attacks each candidate pruning with PGD)")
    g = p.add_argument_group("PBE")
    g.add_argument("--pbe-settings", default=None, help="clean, no-clean or both (default: clean,no-clean)")
    g.add_argument("--pbe-epochs", default=None, help="ADV,CLEAN epochs per round (default: fastpurify.pbe's rounds: "
                   "no-clean the authors', clean 3,17)")
    g.add_argument("--pbe-schedule", default=None, help="no-clean extra-set fractions (default: 0.05,0.2,0.5,0.7)")
    g.add_argument("--pbe-eps", default=None, help="PGD bound, e.g. 6/255 (default)")
    g.add_argument("--pbe-lr", type=float, default=None,
                   help="fine-tuning learning rate (default: fastpurify.pbe's: 1e-3 no-clean, 1e-2 clean)")
    g.add_argument("--pbe-recipe", choices=["authors"], default=None,
                   help="the authors' scripts' rounds (replaces --pbe-epochs; see fastpurify pbe --recipe)")
    g.add_argument("--pbe-initial", choices=["random", "high-loss"], default=None,
                   help="no-clean round 0 drawn at random (the paper, default) or from the least-fitted half")
    g.add_argument("--pbe-exclude-low-loss", type=float, default=None, metavar="SHARE",
                   help="no-clean: keep this share of best-fitted training images out of every extra set (see "
                        "fastpurify pbe --exclude-low-loss; default 0.2 with --pbe-initial high-loss, else 0)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the defenses' precision")
    g.add_argument("--paper-numbers", default=None,
                   help='JSON of the paper\'s values: {"badnets": {"before": [ACC, ASR], "anp": [ACC, ASR]}, ...}')
    g.add_argument("--out", default=None, help="output folder (default: runs/reproduce-<defense>)")
    g.add_argument("--no-progress", action="store_true")
    return p


def _counts(text: str | None, name: str, n: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise InputError(f"{name} must be {n} comma-separated whole numbers, got {text!r}")
    return values


def options(args: argparse.Namespace) -> dict:
    """The keywords of :func:`fastpurify.reproduce.reproduce` from the command line."""
    from .options import parse_anp_eps, parse_patch_area
    from .pbe import parse_pixels, parse_schedule

    adv_clean = _counts(args.pbe_epochs, "--pbe-epochs", 2)
    return dict(
        attacks=tuple(a.strip() for a in args.attacks.split(",") if a.strip()), seeds=args.seeds, arch=args.arch,
        rate=args.rate, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, train_images=args.train_images,
        test_images=args.test_images, clean_images=args.clean_images, anp_iterations=args.iterations,
        anp_eps=None if args.anp_eps is None else parse_anp_eps(args.anp_eps, "--anp-eps"), threshold=args.threshold,
        max_drop=args.max_drop, anp_seeds=args.anp_seeds,
        auto_rule=False if args.no_auto_rule else None, select_order=args.select_order,
        select_correct_stats=args.select_correct_stats or None, select_hold=args.select_hold,
        select_order_area=None if args.select_order_area is None else parse_patch_area(args.select_order_area,
                                                                                         "--select-order-area"),
        pbe_settings=None if args.pbe_settings is None else tuple(s.strip() for s in args.pbe_settings.split(",")),
        pbe_adv_epochs=None if adv_clean is None else adv_clean[0],
        pbe_clean_epochs=None if adv_clean is None else adv_clean[1],
        pbe_schedule=None if args.pbe_schedule is None else tuple(parse_schedule(args.pbe_schedule)),
        pbe_eps=None if args.pbe_eps is None else parse_pixels(args.pbe_eps, "--pbe-eps"),
        pbe_lr=args.pbe_lr, pbe_recipe=args.pbe_recipe, pbe_initial=args.pbe_initial,
        pbe_exclude_low_loss=args.pbe_exclude_low_loss,
    )


def run(args: argparse.Namespace) -> int:
    from ..reproduce import reproduce

    reproduce(args.defense, args.data, out=args.out or f"runs/reproduce-{args.defense}", budget=args.budget,
              device=args.device, precision=args.precision, subject_cache=args.subject_cache,
              paper_numbers=args.paper_numbers, progress=not args.no_progress, **options(args))
    return 0
