"""``fastpurify pbe``: purify a checkpoint with Progressive Backdoor Erasing, evaluate, write everything.

    fastpurify pbe --model runs/demo/model.safetensors --clean-images 100 --out runs/pbe   # clean extra set
    fastpurify pbe --model runs/demo/model.safetensors --out runs/pbe                      # progressive

Two settings (the PBE paper's):

- ``--clean-images N``: the defender holds a clean extra set, the first N images of the data's
  test split (or file); one round of PBE on it; the rest of the test split evaluates.
- otherwise, the progressive setting on the (possibly poisoned) training set: rounds on growing
  extra sets of the training images that look cleanest (``--schedule``); the whole test split
  evaluates. The training set is ``--train-data FILE`` (images, labels and optionally
  ``poison_indices`` or ``poisoned`` flags), or the data source's training split, poisoned again
  as ``fastpurify train`` poisoned it (the checkpoint records its data, poison rate and seed;
  ``--poison-rate`` overrides). Knowing which images were poisoned (ground truth, for evaluation
  only) adds each extra set's poisoned share and each ranking's average precision.

With a trigger (``--attack``, or the one recorded in a fastpurify checkpoint) the ASR is
reported before and after each round. Outputs in ``--out``: ``purified_model.safetensors``,
``report.json``, ``ranking.txt`` (progressive: the final clean-first ranking) and the figures
``pbe_rounds.png`` (ACC / ASR per round) and ``precision_recall.png`` (progressive, with ground
truth).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import describe_calibration
from ..purification import default_exclude_low_loss
from ..validation import InputError, check_fraction, check_positive, check_positive_int
from .options import (FLIP, add_augment_options, add_engine_and_output_options, add_large_model_options,
                      add_model_options, add_trigger_options, micro_batch_option, parse_padding, peak_text,
                      plotting_enabled, process_group)

POISON_KEYS = ("poison_indices", "poisoned")
DEFAULT_EPS = "auto"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("pbe", help="Progressive Backdoor Erasing of a checkpoint (fast engine or reference)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="digits | synthetic | cifar10[:DIR] | DIR | imagefolder:PATH (a "
                   "folder or .tar/.tar.gz/.tar.xz of train/<class>/*.jpg|png and test/...) | cifar10-jpeg[:PATH] | "
                   "FILE.npz/.pt/.safetensors with images and labels (a test split only) (default: the checkpoint's "
                   "training data, else digits)")
    g.add_argument("--size", type=int, default=None, help="image size for digits/synthetic (default: the model's)")
    g.add_argument("--clean-images", type=int, default=None,
                   help="the clean-extra-set setting: the first N images of the test split (or file) are the "
                        "defender's clean extra set, the rest evaluate (default: the progressive setting)")
    g.add_argument("--train-data", default=None,
                   help="progressive setting: the training set as FILE.npz/.pt/.safetensors with images, labels "
                        "and optionally poison_indices (or boolean poisoned) (default: the data's training split)")
    g.add_argument("--poison-rate", type=float, default=None,
                   help="progressive setting: poison the data's training split with the trigger at this rate "
                        "(default: the rate the checkpoint records; 0: use it unpoisoned)")
    add_trigger_options(g)
    g = p.add_argument_group("PBE (defaults: the paper's and its authors' code, except where a help says)")
    g.add_argument("--eps", default=DEFAULT_EPS, help="L-inf PGD bound in pixel units, a number or a fraction "
                   "such as 8/255, or auto: the paper's 6/255, raised (up to 32/255) until the infected model "
                   "misclassifies 80%% of its PGD examples of the extra set (default: %(default)s)")
    g.add_argument("--alpha", default=None, help="PGD step, a number or a fraction (default: eps / 5)")
    g.add_argument("--pgd-steps", type=int, default=7)
    g.add_argument("--random-start", action="store_true", help="start PGD at a random point of the eps-ball")
    g.add_argument("--regenerate", choices=["round", "batch"], default=None,
                   help="PGD examples once per round (the paper's step 1a) or every batch (the authors' code) "
                        "(default: batch progressive, round with --clean-images)")
    g.add_argument("--adv-epochs", default=None, help="epochs on PGD examples per round: one number, or one per "
                   "round comma-separated (a shorter list repeats its last value), e.g. 10,1 (default: progressive, "
                   "the authors' rounds: 10,1 adversarial, 0,9 clean, all,31 adversarial batches; with "
                   "--clean-images 3 + 17; once one of these three is given, the others default to 3, 17, all)")
    g.add_argument("--clean-epochs", default=None, help="epochs on the extra set itself per round, the same way")
    g.add_argument("--adv-batches", default=None, help="with --regenerate batch: only the first N batches of a "
                   "round's adversarial epochs are adversarial, the rest clean; per round the same way, 'all' for "
                   "no cap, e.g. all,31")
    g.add_argument("--recipe", choices=["authors"], default=None,
                   help="the authors' scripts' rounds, instead of --regenerate, --adv-epochs, --clean-epochs and "
                        "--adv-batches: progressive, per-batch PGD, round 0 10 adversarial epochs, later rounds one "
                        "epoch adversarial in its first 31 batches then 9 clean (the default); with a clean extra "
                        "set, per-batch PGD, 3 + 17 epochs")
    g.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: 1e-3 progressive, the "
                   "authors'; 1e-2 with --clean-images or --initial high-loss, fastpurify's: the authors' 1e-3 "
                   "fine-tunes on 50,000 clean images, far more steps than a few hundred give)")
    g.add_argument("--initial", choices=["random", "high-loss"], default="random",
                   help="progressive setting: round 0's extra set drawn from the whole training set (the paper) or "
                        "from the half the infected model fits least (fastpurify's own; poisoned images are fitted "
                        "most confidently)")
    g.add_argument("--exclude-low-loss", type=float, default=None, metavar="SHARE",
                   help="progressive setting: keep this share of the training images, those the infected model fits "
                        "best (lowest loss), out of every round's extra set (fastpurify's own; the poisoned images "
                        "are among them and cannot return in later rounds) (default: 0.2 with --initial high-loss, "
                        "0 with the paper's random round 0)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--batch-size", type=int, default=128)
    add_augment_options(g, auto=True)
    g.add_argument("--schedule", default="0.05,0.2,0.5,0.7",
                   help="progressive setting: the extra set's fraction of the training set per round, the first "
                        "drawn at random (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    add_engine_and_output_options(p, out="runs/pbe")
    p.add_argument("--no-fused-norms", action="store_true",
                   help="fast engine: run PGD through the model's own eval BatchNorms instead of fastpurify's fused "
                        "eval kernels (which it uses on CUDA)")
    add_large_model_options(p, masks=False)
    return p


def parse_pixels(text: str, name: str) -> float:
    """A pixel-unit value given as a number ("0.0235") or a fraction ("6/255")."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise InputError(f"{name} must be a number or a fraction such as 6/255, got {text!r}") from None


def parse_schedule(text: str) -> list[float]:
    """``"0.05,0.2,0.5,0.7"`` -> strictly increasing fractions in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not 0 < v <= 1 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise InputError(f"--schedule must be comma-separated, strictly increasing fractions in (0, 1], e.g. "
                         f"0.05,0.2,0.5,0.7; got {text!r}")
    return values


def parse_per_round(text: str | None, name: str, *, allow_all: bool = False) -> int | list | None:
    """``"3"`` -> 3; ``"10,1"`` -> [10, 1] (one per round); with ``allow_all`` "all" is None."""
    if text is None:
        return None
    values = []
    for part in text.split(","):
        part = part.strip()
        if allow_all and part == "all":
            values.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            value = -1
        if value < (1 if allow_all else 0):
            what = "positive integers or 'all'" if allow_all else "non-negative integers"
            raise InputError(f"{name} must be {what}, one or one per round comma-separated (e.g. 10,1), got {text!r}")
        values.append(value)
    return values[0] if len(values) == 1 else values


def _in_flags(text: str) -> str:
    """An engine error about the round keywords, in the command's words."""
    for keyword, flag in (("regenerate='batch'", "--regenerate batch"), ("regenerate='round'", "--regenerate round"),
                          ("recipe='authors'", "--recipe authors"), ("or None (all)", "or 'all'")):
        text = text.replace(keyword, flag)
    return re.sub(r"(?<![-\w])(adv_epochs|clean_epochs|adv_batches|regenerate)\b",
                  lambda m: "--" + m.group(1).replace("_", "-"), text)


def _rounds(progressive: bool, schedule_length: int, recipe: str | None, given: dict):
    """The run's round keywords and each round's spec, as the engines will plan them."""
    from ..purification import plan_rounds

    setting = "training set" if progressive else "clean extra set"
    return plan_rounds(setting, recipe, given, schedule_length if progressive else 1)


def _check(args) -> dict:
    """Check the arguments before any work; return the engines' keywords."""
    eps = "auto" if args.eps == "auto" else parse_pixels(args.eps, "--eps")
    alpha = None if args.alpha is None else parse_pixels(args.alpha, "--alpha")
    if eps != "auto":
        check_positive(eps, "--eps")
    if alpha is not None:
        check_positive(alpha, "--alpha")
    if args.lr is not None:
        check_positive(args.lr, "--lr")
    if args.initial != "random" and args.clean_images is not None:
        raise InputError("--initial picks round 0 of the progressive setting; --clean-images has one round on the "
                         "clean extra set: give one or the other")
    if args.exclude_low_loss is not None:
        check_fraction(args.exclude_low_loss, "--exclude-low-loss", low_open=False)
    if args.exclude_low_loss and args.clean_images is not None:
        raise InputError("--exclude-low-loss keeps training images out of the progressive setting's extra sets; "
                         "--clean-images has one round on the clean extra set: give one or the other")
    for name in ("pgd_steps", "batch_size"):
        check_positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    padding = parse_padding(args.padding)
    adv_epochs = parse_per_round(args.adv_epochs, "--adv-epochs")
    clean_epochs = parse_per_round(args.clean_epochs, "--clean-epochs")
    adv_batches = parse_per_round(args.adv_batches, "--adv-batches", allow_all=True)
    check_fraction(args.momentum, "--momentum", low_open=False)
    check_fraction(args.weight_decay, "--weight-decay", low_open=False)
    if args.clean_images is not None:
        check_positive_int(args.clean_images, "--clean-images")
        if args.train_data is not None or args.poison_rate is not None:
            raise InputError("--train-data and --poison-rate are for the progressive setting; --clean-images picks "
                             "the clean-extra-set setting: give one or the other")
    if args.poison_rate is not None:
        check_fraction(args.poison_rate, "--poison-rate", low_open=False)
    schedule = parse_schedule(args.schedule)
    share = args.exclude_low_loss
    if share is None:
        share = default_exclude_low_loss(args.clean_images is None, args.initial)
    if share and schedule[-1] > 1 - share:
        which = "" if args.exclude_low_loss is not None else (f" (--initial {args.initial}'s default; give 0 to "
                                                              "keep none out)")
        raise InputError(f"--exclude-low-loss {share}{which} leaves {1 - share:.0%} of the training images to choose "
                         f"from, but --schedule's last round takes {schedule[-1]:.0%}: lower one of them")
    try:  # errors before any work, in the command's words
        _rounds(args.clean_images is None, len(schedule), args.recipe, dict(
            regenerate=args.regenerate, adv_epochs=adv_epochs, clean_epochs=clean_epochs, adv_batches=adv_batches))
    except InputError as e:
        raise InputError(_in_flags(str(e))) from None
    return dict(eps=eps, alpha=alpha, pgd_steps=args.pgd_steps, random_start=args.random_start,
                regenerate=args.regenerate, adv_epochs=adv_epochs, clean_epochs=clean_epochs,
                adv_batches=adv_batches, recipe=args.recipe, initial=args.initial,
                exclude_low_loss=args.exclude_low_loss, lr=args.lr,
                momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
                augment=not args.no_augment, padding=padding, flip=FLIP[args.flip],
                schedule=schedule, seed=args.seed, progress=not args.no_progress)


@dataclass
class PBEInputs:
    """What one run purifies with and evaluates on."""

    setting: str                      # "clean extra set" or "training set"
    data: str                         # where the extra set / training set came from
    extra: tuple[torch.Tensor, torch.Tensor]   # the clean extra set, or the training set
    test: tuple[torch.Tensor, torch.Tensor]
    poison_indices: torch.Tensor | None = None
    note: str = ""

    @property
    def progressive(self) -> bool:
        return self.setting == "training set"


def _recorded_poisoning(meta: dict, data: str) -> dict:
    """How ``fastpurify train`` poisoned the checkpoint's training set, if it recorded it for
    this data source (``{"data", "rate", "seed"}``), else ``{}``."""
    recorded = meta.get("poison")
    return recorded if isinstance(recorded, dict) and recorded.get("data") == data else {}


def _inputs(args, meta: dict, attack) -> PBEInputs:
    """Load the data of the chosen setting: the clean extra set and the evaluation images, or
    the training set (with its ground truth when known) and the test split."""
    from ..data import load_source

    data = args.data or (meta.get("poison") or {}).get("data") or "digits"
    recorded = _recorded_poisoning(meta, data)
    size = args.size or (meta.get("image_size") or [None])[0]
    splits = load_source(data, size=size, channels=meta.get("in_channels"), seed=recorded.get("seed", args.seed),
                         progress=False if args.no_progress else None)
    images, labels = splits.test
    if labels.numel() and int(labels.max()) >= meta["num_classes"]:
        raise InputError(f"the data has labels up to {int(labels.max())} but the model has {meta['num_classes']} "
                         "classes")
    if args.clean_images is not None:
        n = args.clean_images
        if n >= images.shape[0]:
            raise InputError(f"--clean-images must be below {images.shape[0]}, the images of {splits.name}'s test "
                             f"split (the rest evaluate), got {n}")
        return PBEInputs("clean extra set", f"the first {n} test images of {splits.name}", (images[:n], labels[:n]),
                         (images[n:], labels[n:]))
    if args.train_data is not None:
        train, poisoned, note = _train_file(Path(args.train_data))
        if train[0].shape[1:] != images.shape[1:]:
            raise InputError(f"{args.train_data} holds {tuple(train[0].shape[1:])} images but the test split of "
                             f"{splits.name} holds {tuple(images.shape[1:])}: give --data and --size to match")
        return PBEInputs("training set", str(args.train_data), train, splits.test, poisoned, note)
    if splits.train[1].numel() == 0:
        raise InputError(f"{splits.name} has no training split: give --train-data FILE for the progressive setting, "
                         "or --clean-images N for a clean extra set")
    rate = args.poison_rate if args.poison_rate is not None else recorded.get("rate")
    if not rate:
        why = "--poison-rate 0" if rate == 0 else "the checkpoint records no poisoning of it"
        return PBEInputs("training set", f"{splits.name}'s training split, unpoisoned", splits.train, splits.test,
                         note=f"the training split is used as it is ({why}); pass --poison-rate R to poison it with "
                              "the trigger as `fastpurify train` does")
    if attack is None:
        raise InputError("poisoning the training split needs a trigger: pass --attack, or --poison-rate 0")
    from ..backdoor import poison

    poisoned = poison(splits.train, attack, rate, seed=recorded.get("seed", args.seed))
    return PBEInputs("training set", f"{splits.name}'s training split, poisoned at rate {rate}", poisoned.tensors,
                     splits.test, poisoned.poison_indices)


def _train_file(path: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None, str]:
    """A training set from a file, and its ground truth if it holds one."""
    from ..data.tensor_file import load_tensor_file

    train = load_tensor_file(path)
    poisoned = _poison_key(path)
    note = "" if poisoned is not None else (f"{path.name} holds no {' or '.join(POISON_KEYS)}: the poisoned share "
                                           "and average precision of the rounds are not known")
    return train, poisoned, note


def _poison_key(path: Path) -> torch.Tensor | None:
    """The optional ground truth of a training-set file (already read safely once by
    :func:`load_tensor_file`), read the same safe way: indices or boolean flags, or None."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as npz:
            key = next((k for k in POISON_KEYS if k in npz.files), None)
            return None if key is None else torch.from_numpy(npz[key])
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            key = next((k for k in POISON_KEYS if k in fh.keys()), None)
            return None if key is None else fh.get_tensor(key)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        return None
    key = next((k for k in POISON_KEYS if k in loaded), None)
    return None if key is None else torch.as_tensor(loaded[key])


def run(args: argparse.Namespace) -> int:
    """The command; under torchrun every rank purifies together and rank 0 writes."""
    micro_batch = micro_batch_option(args)  # a clear error before any process group or data
    if micro_batch == "auto":
        raise InputError("--micro-batch auto is for anp; give pbe a number of images")
    with process_group(args):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .. import __version__
    from .. import distributed as D
    from ..backdoor import evaluate, weak_attack_warning
    from ..checkpoint import load_model, save_model
    from ..files import write_json
    from .anp import _attack

    settings = _check(args)
    model, meta = load_model(args.model, args.arch, args.num_classes, args.in_channels,
                             trust_pickle=args.trust_pickle)
    attack = _attack(args, meta, meta["num_classes"])
    inputs = _inputs(args, meta, attack)
    out = Path(args.out)
    if D.is_main():
        _announce(args, meta, inputs, settings)
    purified, report = _purify(args, model, inputs, attack, settings)
    if not D.is_main():
        return 0  # every rank holds the same purified model; rank 0 evaluates and writes
    after = evaluate(purified, *inputs.test, attack)
    purified = purified.cpu()
    save_model(purified, out / "purified_model.safetensors",
               metadata={**meta, "purified": {"defense": "pbe", "setting": inputs.setting,
                                              "rounds": len(report.rounds), "engine": args.engine}})
    files = ["purified_model.safetensors", "report.json"]
    if report.ranking is not None:
        files.append(write_ranking(out / "ranking.txt", report).name)
    figures = _figures(args, report, out)
    print(format_rounds(report), end="")
    print(f"PBE: {len(report.rounds)} round(s) in {report.seconds:.1f} s on {report.engine.get('device', '?')}"
          f"{peak_text(report.engine)}; on {inputs.test[1].numel()} test images: before {_metrics(report.before)}; "
          f"after {_metrics(after)}")
    warning = weak_attack_warning((report.before or {}).get("asr"))
    if warning:
        print(f"warning: {warning}")
    summary = report.summary()
    write_json(out / "report.json", {
        "fastpurify": __version__, "command": "pbe", "model": str(args.model), "arch": meta["arch"],
        "setting": inputs.setting, "data": inputs.data, "extra_images": int(inputs.extra[1].numel()),
        "evaluated_images": int(inputs.test[1].numel()),
        "poisoned_images": None if report.poisoned is None else int(report.poisoned.sum()),
        "engine": args.engine, "engine_info": summary["engine"], "settings": summary["settings"],
        "seconds": round(report.seconds, 3), "peak_memory_bytes": report.engine.get("peak_memory_bytes"),
        "peak_memory_kind": report.engine.get("peak_memory_kind"), "before": report.before, "after": after, "rounds": summary["rounds"],
        "adversarial_labels": summary["adversarial_labels"], **({"warning": warning} if warning else {}),
        "attack": None if attack is None else repr(attack), "figures": figures,
        "arguments": {k: v for k, v in vars(args).items() if k != "command"}})
    print(f"wrote {out}/" + ", ".join(files + [Path(f).name for f in figures]))
    return 0


def _announce(args, meta: dict, inputs: PBEInputs, settings: dict) -> None:
    from ..purification import describe_rounds

    keys = ("regenerate", "adv_epochs", "clean_epochs", "adv_batches")
    rounds, specs = _rounds(inputs.progressive, len(settings["schedule"]), settings["recipe"],
                            {k: settings[k] for k in keys})
    truth = ""
    if inputs.progressive and inputs.poison_indices is not None:
        flags = inputs.poison_indices
        count = int(flags.sum()) if flags.dtype == torch.bool else flags.numel()
        truth = f" ({count} poisoned, known)"
    print(f"{meta['arch']} from {args.model}; PBE on a {inputs.setting}: {inputs.extra[1].numel()} images of "
          f"{inputs.data}{truth}; {inputs.test[1].numel()} test images evaluate; {args.engine} engine, {len(specs)} "
          f"round(s): {describe_rounds(specs)} (PGD every {rounds['regenerate']}), "
          f"eps {args.eps}")
    if inputs.note:
        print(f"note: {inputs.note}")


def _purify(args, model, inputs: PBEInputs, attack, settings: dict):
    """Run the chosen engine on the chosen setting."""
    from ..engines.pbe import pbe as fast_pbe
    from ..engines.runtime import resolve_device
    from ..reference import pbe as reference_pbe

    data = dict(test_data=inputs.test, attack=attack)
    if inputs.progressive:
        data.update(train_data=inputs.extra, poison_indices=inputs.poison_indices)
    else:
        data.update(clean_data=inputs.extra)
    if args.engine == "reference":
        return reference_pbe(model.to(resolve_device(args.device)), **data, **settings)
    return fast_pbe(model, **data, **settings, device=args.device, precision=args.precision,
                    cuda_graph=False if args.no_cuda_graph else None,
                    channels_last=False if args.no_channels_last else None, tf32=not args.no_tf32,
                    micro_batch=micro_batch_option(args), checkpoint=args.checkpoint,
                    fused_norms=False if args.no_fused_norms else None)


def _metrics(m: dict | None) -> str:
    if m is None:
        return "-"
    return f"ACC {m['acc']:.1%}" + (f", ASR {m['asr']:.1%}" if m.get("asr") is not None else "")


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_rounds(report) -> str:
    """The per-round table: round 0 is the infected model, the rounds of PBE count from 1; "adv
    ACC" / "adv ASR" are measured after the round's adversarial epochs (step 1b), "ACC" / "ASR"
    after its clean epochs (step 2). Then how the infected model labels its PGD examples."""
    row = "{:>5}  {:>8}  {:>9}  {:>8}  {:>6}  {:>7}  {:>7}  {:>6}  {:>6}  {:>7}\n"
    before = report.before or {}
    lines = [row.format("round", "fraction", "extra set", "poisoned", "AP", "adv ACC", "adv ASR", "ACC", "ASR",
                        "seconds"),
             row.format(0, "before", "-", "-", "-", "-", "-", _cell(before.get("acc"), ".1%"),
                        _cell(before.get("asr"), ".1%"), "-")]
    for r in report.rounds:
        lines.append(row.format(r.round + 1, "clean" if r.fraction is None else format(r.fraction, ".0%"), r.size,
                                _cell(r.poisoned_fraction, ".1%"), _cell(r.average_precision, ".3f"),
                                _cell(r.adv_acc, ".1%"), _cell(r.adv_asr, ".1%"), _cell(r.acc, ".1%"),
                                _cell(r.asr, ".1%"), format(r.seconds, ".1f")))
    calibration = report.settings.get("calibration")
    if calibration:
        lines.append(describe_calibration(calibration) + "\n")
    labels = report.adversarial_labels
    if labels:
        target = f"; the trigger's target {labels['target']}: {labels['target_share']:.0%}" if "target" in labels else ""
        lines.append(f"the infected model labels its PGD examples of {labels['images']} extra-set images as class "
                     f"{labels['top_class']} most often ({labels['top_share']:.0%}){target}\n")
    return "".join(lines)


def write_ranking(path: Path, report) -> Path:
    """The final clean-first ranking: one training image per line, index and score (and the
    ground-truth poisoned flag when known), most likely clean first."""
    from ..files import write_text

    last = report.rounds[-1]
    ranking, scores = last.ranking.cpu(), last.scores.cpu().double()
    flags = None if report.poisoned is None else report.poisoned.cpu()
    header = "# PBE's final ranking of the training images, most likely clean first; score: cosine similarity of " \
             "the infected and the purified model's logits\n# index\tscore" + ("\tpoisoned" if flags is not None
                                                                              else "") + "\n"
    rows = [f"{i}\t{scores[i]:.6f}" + (f"\t{int(flags[i])}" if flags is not None else "") for i in ranking.tolist()]
    return write_text(path, header + "\n".join(rows) + "\n")


def _figures(args, report, out: Path) -> list[str]:
    from ..plots import pbe_rounds, precision_recall

    if not plotting_enabled(args):
        return []
    files = []
    if report.before is not None:
        files.append(pbe_rounds(report, out / "pbe_rounds.png"))
    if report.ranking is not None and report.poisoned is not None:
        files.append(precision_recall(report, out / "precision_recall.png"))
    elif report.ranking is not None:
        print("precision_recall.png skipped: which training images are poisoned is not known")
    return [str(f) for f in files]
