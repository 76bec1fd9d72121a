"""The ``fastpurify`` command line.

    fastpurify demo                      poison the bundled digits with BadNets, train a backdoored
                                         small CNN, report ACC / ASR, save it (safetensors); then
                                         purify it with fastpurify.anp (timed against the reference)
                                         + the clean-data pruning rule, and with fastpurify.pbe on
                                         the same clean images (timed against the reference)
    fastpurify train --data ... --arch ... --attack ...   the same for any source / model / attack
    fastpurify anp --model CKPT --data ... --out DIR      ANP masks, pruning, ACC/ASR, figures
    fastpurify pbe --model CKPT [--clean-images N] --out DIR   PBE on a clean extra set or, progressively,
                                         on the (poisoned) training set; ACC/ASR per round, figures
    fastpurify bench anp|pgd|pbe                          throughput: fastpurify vs reference
    fastpurify reproduce anp|pbe --data cifar10-jpeg ...  the papers' CIFAR-10 tables: backdoored subjects
                                         (cached), the defense with the paper's settings, table.md/json/png

On Linux the command keeps freed memory in the process (glibc's malloc thresholds raised, see
fastpurify/cpu_memory.py): eager CPU steps then stop page-faulting their activations in again.
FASTPURIFY_KEEP_FREED_MEMORY=0 turns that off.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .commands import anp as anp_command
from .commands import bench as bench_command
from .commands import pbe as pbe_command
from .commands import reproduce as reproduce_command
from .cpu_memory import keep_freed_memory_unless_opted_out
from .validation import InputError, check_fraction, check_positive, check_positive_int

DEMO = dict(data="digits", arch="small_cnn", attack="badnets", mode="all2one", target=0, rate=0.1, epochs=15,
            lr=0.05, batch_size=64, size=32, channels=1, padding=4, no_flip=True, out="runs/demo",
            anp_iterations=200, anp_batch_size=64, clean_images=100, max_drop=0.02,
            pbe_eps="16/255", pbe_lr=0.01, pbe_batch_size=32, pbe_adv_epochs=3, pbe_clean_epochs=17)


def _add_train_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=defaults.get("data", "digits"),
                   help="digits | synthetic | cifar10[:DIR] | DIR with CIFAR-10 python batches | imagefolder:PATH "
                        "(train/<class>/*.jpg|png and test/..., a folder or .tar/.tar.gz/.tar.xz; decoded once, "
                        "cached) | cifar10-jpeg[:PATH] (CIFAR-10 (JPEG copy): cifar10-jpeg.tar.xz, found in "
                        "$FASTPURIFY_DATA, ./data or ../shared/data) (default: %(default)s)")
    g.add_argument("--size", type=int, default=defaults.get("size"), help="image size for digits/synthetic")
    g.add_argument("--channels", type=int, default=defaults.get("channels"), help="1 or 3 for digits/synthetic")
    g = p.add_argument_group("attack")
    g.add_argument("--attack", default=defaults.get("attack", "badnets"), help="badnets | blend | sig | wanet")
    g.add_argument("--mode", default=defaults.get("mode", "all2one"), choices=["all2one", "all2all"])
    g.add_argument("--target", type=int, default=defaults.get("target", 0), help="target class (all2one)")
    g.add_argument("--rate", type=float, default=defaults.get("rate", 0.1), help="poison rate in (0, 1)")
    g = p.add_argument_group("training")
    g.add_argument("--arch", default=defaults.get("arch", "cifar_resnet18"),
                   help="cifar_resnet18 | preact_resnet18 | small_cnn | torchvision:<name> | timm:<name>")
    g.add_argument("--epochs", type=int, default=defaults.get("epochs", 30))
    g.add_argument("--lr", type=float, default=defaults.get("lr", 0.05))
    g.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 128))
    g.add_argument("--padding", type=int, default=defaults.get("padding", 4), help="random-crop padding")
    g.add_argument("--no-flip", action="store_true", default=defaults.get("no_flip", False))
    g.add_argument("--no-augment", action="store_true", default=False)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=defaults.get("out", "runs/train"), help="output folder (default: %(default)s)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true")


def _add_anp_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    g = p.add_argument_group("purification (ANP, after training)")
    g.add_argument("--anp-iterations", type=int, default=defaults["anp_iterations"],
                   help="ANP iterations (the paper runs 2000; default: %(default)s)")
    g.add_argument("--anp-batch-size", type=int, default=defaults["anp_batch_size"],
                   help="ANP batch size (the paper uses 128; default: %(default)s)")
    g.add_argument("--clean-images", type=int, default=defaults["clean_images"],
                   help="held-out test images given to the defender as its clean set; the rest evaluate "
                        "(default: %(default)s)")
    g.add_argument("--max-drop", type=float, default=defaults["max_drop"],
                   help="prune the most neurons whose clean accuracy on the defender's set drops by at most "
                        "this fraction (default: %(default)s)")


def _add_pbe_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    g = p.add_argument_group("purification (PBE on the same clean images, after ANP)")
    g.add_argument("--pbe-eps", default=defaults["pbe_eps"],
                   help="PGD bound (the paper's 6/255 is for CIFAR-10; these near-binary scans need more; "
                        "default: %(default)s)")
    g.add_argument("--pbe-lr", type=float, default=defaults["pbe_lr"],
                   help="fine-tuning learning rate (the paper: 1e-3 with 128 per batch, which barely moves "
                        "on 100 images; default: %(default)s)")
    g.add_argument("--pbe-batch-size", type=int, default=defaults["pbe_batch_size"], help="default: %(default)s")
    g.add_argument("--pbe-adv-epochs", type=int, default=defaults["pbe_adv_epochs"],
                   help="epochs on PGD examples (the paper's; default: %(default)s)")
    g.add_argument("--pbe-clean-epochs", type=int, default=defaults["pbe_clean_epochs"],
                   help="epochs on the clean images (the paper's; default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpurify", description="Fast backdoor removal for image classifiers.")
    parser.add_argument("--version", action="version", version=f"fastpurify {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the embedded end-to-end demo on the bundled digits (CPU, a few minutes)")
    _add_train_args(demo, DEMO)
    _add_anp_args(demo, DEMO)
    _add_pbe_args(demo, DEMO)
    train = sub.add_parser("train", help="train a backdoored model (a test subject for the defenses)")
    _add_train_args(train, {})
    anp_command.add_parser(sub)
    pbe_command.add_parser(sub)
    bench_command.add_parser(sub)
    reproduce_command.add_parser(sub)
    return parser


def _train(args: argparse.Namespace):
    """Poison, train, evaluate and save the backdoored model; return what the commands report."""
    import torch

    from .backdoor import make_attack, train_backdoored
    from .checkpoint import save_model
    from .engines.runtime import resolve_device
    from .data import load_source
    from .models import build_model

    device = resolve_device(args.device)
    splits = load_source(args.data, size=args.size, channels=args.channels, seed=args.seed,
                         progress=False if args.no_progress else None)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, num_classes=splits.num_classes, in_channels=splits.channels)
    attack = make_attack(args.attack, num_classes=splits.num_classes, target=args.target, mode=args.mode,
                         seed=args.seed)
    shape = tuple(splits.train[0].shape[1:])
    print(f"data {splits.name}: {len(splits.train[1])} train / {len(splits.test[1])} test images of {shape}; "
          f"{attack!r} at rate {args.rate}; model {args.arch} on {device}")
    start = time.perf_counter()
    subject = train_backdoored(model, splits.train, splits.test, attack, args.rate, seed=args.seed,
                               epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                               augment=not args.no_augment, padding=args.padding, flip=not args.no_flip,
                               device=device, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    m = subject.metrics
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "no_progress")}
    meta = {"arch": args.arch, "num_classes": splits.num_classes, "in_channels": splits.channels,
            "image_size": list(shape[1:]), "attack": {"name": args.attack, "mode": args.mode, "target": args.target,
                                                      "seed": args.seed},
            "poison": {"data": args.data, "rate": args.rate, "seed": args.seed}}
    save_model(subject.model, out / "model.safetensors", metadata=meta)
    report = {"fastpurify": __version__, "settings": settings, "device": str(device), "seconds": round(seconds, 2),
              "num_poisoned": int(subject.poisoned.poison_indices.numel()), "metrics": m,
              "train_loss": subject.history.loss, "train_accuracy": subject.history.accuracy}
    ra = f", RA {m['ra']:.1%}" if "ra" in m else ""
    print(f"backdoored model: ACC {m['acc']:.1%}, ASR {m['asr']:.1%}{ra} ({seconds:.1f} s)")
    from .backdoor import implant_warning

    warning = implant_warning(m["asr"])
    if warning:
        report["warning"] = warning
        print(f"warning: {warning}")
    return subject, splits, out, meta, report


def cmd_train(args: argparse.Namespace) -> int:
    from .files import write_json

    _, _, out, _, report = _train(args)
    write_json(out / "report.json", report)
    print(f"wrote {out / 'model.safetensors'} and {out / 'report.json'}")
    return 0


def _purify_with_anp(subject, test, args: argparse.Namespace, out: Path, meta: dict) -> dict:
    """ANP on the defender's clean images (the first ``--clean-images`` of the held-out test
    split: a defender holds a little clean data, never the untrusted training set): the fast
    engine and, for its time, the reference with the same seed; pruning by the clean-data rule
    on the fast engine's masks; ACC / ASR before and after on the rest of the test split."""
    from .backdoor import evaluate
    from .checkpoint import save_model
    from .engines.anp import anp as fast_anp
    from .pruning import prune_by_clean_accuracy
    from .reference import anp as reference_anp

    n = args.clean_images
    if n >= len(test[1]):
        raise InputError(f"--clean-images must be below {len(test[1])}, the size of the test split (the rest "
                         f"evaluate), got {n}")
    clean, held_out = (test[0][:n], test[1][:n]), (test[0][n:], test[1][n:])
    kw = dict(iterations=args.anp_iterations, batch_size=args.anp_batch_size, padding=args.padding,
              flip=not args.no_flip, seed=args.seed, progress=not args.no_progress)
    reference = reference_anp(subject.model, clean, **kw)
    result = fast_anp(subject.model, clean, device=args.device, **kw)
    gap = max(float((reference.masks[k] - result.masks[k]).abs().max()) for k in result.masks)
    choice = prune_by_clean_accuracy(subject.model, result.masks, *clean, max_drop=args.max_drop)
    reference_choice = prune_by_clean_accuracy(subject.model, reference.masks, *clean, max_drop=args.max_drop)
    before = evaluate(subject.model, *held_out, subject.attack)
    after = evaluate(choice.model, *held_out, subject.attack)
    reference_after = evaluate(reference_choice.model, *held_out, subject.attack)
    result.save(out / "mask_values.txt")
    save_model(choice.model, out / "pruned_model.safetensors",
               metadata={**meta, "pruned": {"neurons": choice.point.pruned, "threshold": choice.point.value}})
    print(f"ANP: {args.anp_iterations} iterations on {n} held-out clean images: fastpurify.anp "
          f"{result.seconds:.1f} s, reference {reference.seconds:.1f} s ({reference.seconds / result.seconds:.2f}x; "
          f"on {result.engine['device']}); " + _mask_agreement(gap))
    print(f"pruned {choice.point.pruned} of {result.num_neurons} neurons (threshold {choice.point.value}, the "
          f"largest whose clean ACC drops by at most {args.max_drop * 100:g} points)")
    print(f"on the other {len(held_out[1])} test images: before ACC {before['acc']:.1%}, ASR {before['asr']:.1%}; "
          f"after ACC {after['acc']:.1%}, ASR {after['asr']:.1%} (the reference's masks by the same rule: "
          f"{reference_choice.point.pruned} pruned, ACC {reference_after['acc']:.1%}, ASR {reference_after['asr']:.1%})")
    return {"settings": result.settings, "seconds": round(result.seconds, 2),
            "reference_seconds": round(reference.seconds, 2), "engine": result.engine,
            "masks_equal_reference": gap <= 1e-4, "max_mask_gap": gap, "num_neurons": result.num_neurons,
            "reference_pruned": reference_choice.point.pruned, "reference_after": reference_after,
            "pruned": choice.point.pruned, "threshold": choice.point.value, "max_drop": args.max_drop,
            "clean_images": n, "evaluated_images": len(held_out[1]), "before": before, "after": after,
            "clean_sweep": [{"threshold": p.value, "pruned": p.pruned, "acc": p.acc} for p in choice.points]}


def _mask_agreement(gap: float) -> str:
    """How the demo's fast masks compare with the reference's: equal where the fast engine does the
    reference's arithmetic (the CPU in NCHW); by default it sums in other orders (channels_last on
    the CPU and CUDA; on CUDA also the fused kernels and TF32)."""
    if gap <= 1e-4:
        return "masks equal to the reference's within 1e-4"
    return (f"masks differ from the reference's by up to {gap:.3f} (the fast engine sums in another order, and "
            "ANP's masks follow that the way they follow another seed)")


def _pbe_settings(args: argparse.Namespace) -> dict:
    """The demo's PBE keywords, checked before any work."""
    eps = pbe_command.parse_pixels(args.pbe_eps, "--pbe-eps")
    check_positive(eps, "--pbe-eps")
    check_positive(args.pbe_lr, "--pbe-lr")
    check_positive_int(args.pbe_batch_size, "--pbe-batch-size")
    for name in ("pbe_adv_epochs", "pbe_clean_epochs"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.pbe_adv_epochs + args.pbe_clean_epochs == 0:
        raise InputError("--pbe-adv-epochs + --pbe-clean-epochs must be at least 1")
    return dict(eps=eps, lr=args.pbe_lr, batch_size=args.pbe_batch_size, adv_epochs=args.pbe_adv_epochs,
                clean_epochs=args.pbe_clean_epochs, padding=args.padding, flip=not args.no_flip, seed=args.seed,
                progress=not args.no_progress)


def _purify_with_pbe(subject, test, args: argparse.Namespace, out: Path, meta: dict, settings: dict) -> dict:
    """PBE on the same clean images ANP had (the first ``--clean-images`` of the test split),
    one round in the clean-extra-set setting: the fast engine and, for its time, the reference
    with the same seed; ACC / ASR before and after on the rest of the test split."""
    from .checkpoint import save_model
    from .engines.pbe import pbe as fast_pbe
    from .reference import pbe as reference_pbe

    n = args.clean_images
    clean, held_out = (test[0][:n], test[1][:n]), (test[0][n:], test[1][n:])
    kw = dict(clean_data=clean, test_data=held_out, attack=subject.attack, **settings)
    _, reference = reference_pbe(subject.model, **kw)
    purified, report = fast_pbe(subject.model, device=args.device, **kw)
    before, after, ref_after = report.before, report.rounds[-1], reference.rounds[-1]
    save_model(purified.cpu(), out / "purified_model.safetensors",
               metadata={**meta, "purified": {"defense": "pbe", "setting": "clean extra set", "rounds": 1}})
    print(f"PBE: {settings['adv_epochs']} + {settings['clean_epochs']} epochs on the same {n} clean images "
          f"(eps {args.pbe_eps}): fastpurify.pbe {report.seconds:.1f} s, reference {reference.seconds:.1f} s "
          f"(on {report.engine['device']}); reference after: ACC {ref_after.acc:.1%}, ASR {ref_after.asr:.1%}")
    print(f"on the other {len(held_out[1])} test images: before ACC {before['acc']:.1%}, ASR {before['asr']:.1%}; "
          f"after ACC {after.acc:.1%}, ASR {after.asr:.1%}")
    return {"settings": report.settings, "seconds": round(report.seconds, 2),
            "reference_seconds": round(reference.seconds, 2), "engine": report.engine, "clean_images": n,
            "evaluated_images": len(held_out[1]), "before": before, "after": {"acc": after.acc, "asr": after.asr},
            "reference_after": {"acc": ref_after.acc, "asr": ref_after.asr}}


def cmd_demo(args: argparse.Namespace) -> int:
    from .files import write_json

    check_positive_int(args.anp_iterations, "--anp-iterations")
    check_positive_int(args.anp_batch_size, "--anp-batch-size")
    check_positive_int(args.clean_images, "--clean-images")
    check_fraction(args.max_drop, "--max-drop", low_open=False, high_open=False)
    pbe_settings = _pbe_settings(args)
    subject, splits, out, meta, report = _train(args)
    report["anp"] = _purify_with_anp(subject, splits.test, args, out, meta)
    report["pbe"] = _purify_with_pbe(subject, splits.test, args, out, meta, pbe_settings)
    write_json(out / "report.json", report)
    print(f"wrote {out / 'model.safetensors'}, {out / 'mask_values.txt'}, {out / 'pruned_model.safetensors'}, "
          f"{out / 'purified_model.safetensors'} and {out / 'report.json'}")
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "anp": anp_command.run, "pbe": pbe_command.run,
            "bench": bench_command.run, "reproduce": reproduce_command.run}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory_unless_opted_out()  # eager CPU steps stop page-faulting (fastpurify/cpu_memory.py)
    try:
        return COMMANDS[args.command](args)
    except (InputError, FileNotFoundError) as err:
        print(f"fastpurify {args.command}: error: {err}", file=sys.stderr)
        return 2
