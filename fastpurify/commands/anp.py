"""``fastpurify anp``: learn ANP masks for a checkpoint, prune, evaluate, write everything.

    fastpurify anp --model runs/demo/model.safetensors --data digits --out runs/anp

Inputs: a checkpoint (safetensors or ``.pt`` read with ``weights_only=True``; a pickled full
model only with ``--trust-pickle``), a data source whose test split (or file) gives the
defender's clean images (the first ``--clean-images``) and the evaluation images (the rest).
With a trigger (``--attack``, or the one recorded in a fastpurify checkpoint) ACC and ASR are
reported before and after pruning. Outputs in ``--out``: ``mask_values.txt`` (official format),
``masks.json``, ``pruned_model.safetensors``, ``sweep.txt`` (the official table),
``report.json``, and the figures ``mask_distribution.png`` and ``pruning_curve.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..validation import InputError, check_fraction, check_hold, check_positive_int
from .options import (add_augment_options, add_engine_and_output_options, add_large_model_options,
                      add_model_options, add_trigger_options, micro_batch_option, parse_anp_eps, parse_patch_area,
                      peak_text, plotting_enabled, process_group)

PRUNE_RULES = ("threshold", "number", "fraction", "max_drop")
SELECT_RULES = ("auto", "threshold", "number", "fraction", "max-drop")
DEFAULT_SEEDS, DEFAULT_SELECT = 1, "threshold"
PROBES, DEFAULT_PROBE = ("inputs", "patch", "neurons"), "patch"  # selection.PROBES, without importing torch here
ORDERS = ("masks", "patch")  # selection.ORDERS


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("anp", help="Adversarial Neuron Pruning of a checkpoint (fast engine or reference)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", help="digits | synthetic | cifar10[:DIR] | DIR | imagefolder:PATH "
                   "(a folder or .tar/.tar.gz/.tar.xz of train/<class>/*.jpg|png and test/...) | cifar10-jpeg[:PATH] | "
                   "FILE.npz/.pt/.safetensors with images and labels (default: %(default)s)")
    g.add_argument("--size", type=int, default=None, help="image size for digits/synthetic (default: the model's)")
    g.add_argument("--clean-images", type=int, default=500,
                   help="the first N images of the test split (or file) are the defender's clean set; the rest "
                        "evaluate (default: %(default)s, the paper's 1%% of CIFAR-10)")
    add_trigger_options(g)
    g = p.add_argument_group("ANP (defaults: the paper's)")
    g.add_argument("--iterations", type=int, default=2000)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--eps", default="0.4",
                   help="the neuron perturbation's bound, or 'auto': the smallest up to 0.4 at which one sign step of "
                        "every neuron halves the clean accuracy (fastpurify.anp_eps; smaller networks get a smaller "
                        "bound) (default: %(default)s, the paper's)")
    g.add_argument("--steps", type=int, default=1)
    g.add_argument("--alpha", type=float, default=0.2)
    g.add_argument("--lr", type=float, default=0.2)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--no-clamp-noise", action="store_true", help="the official script's unclamped noise")
    add_augment_options(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help="a seed ensemble: train K mask sets at once (seeds SEED..SEED+K-1, each exactly its single "
                        "run) and prune by their aggregate (default: %(default)s)")
    g.add_argument("--aggregate", choices=["mean", "rank"], default="mean",
                   help="the ensemble's score per neuron: the mean mask or the mean rank (default: %(default)s)")
    g = p.add_argument_group("pruning (one rule; default: --select %s)" % DEFAULT_SELECT)
    g.add_argument("--select", choices=SELECT_RULES, default=None,
                   help="auto: prune until a trigger reconstructed on the clean images no longer sends them to the "
                        "class their adversarial examples pile onto (no trigger needed; docs/anp-selection.md); "
                        "threshold|number|fraction|max-drop: the value given with that option (default: the rule of "
                        f"the value option given, else {DEFAULT_SELECT})")
    g.add_argument("--max-target-share", type=float, default=0.05,
                   help="auto: the probe's share on the suspected target at which the backdoor counts as gone "
                        "(default: %(default)s)")
    g.add_argument("--acc-budget", type=float, default=0.1,
                   help="auto: the most clean accuracy (a fraction) pruning may cost (default: %(default)s)")
    g.add_argument("--select-probe", choices=PROBES, default=DEFAULT_PROBE,
                   help="auto: what measures the backdoor after each pruning: patch (a trigger reconstructed toward "
                        "the suspected target: the share of the other images it sends there; where the input "
                        "adversary's pull names no target, a patch toward every class in turn names it), inputs "
                        "(each clean image's PGD examples: their share on the target) or neurons "
                        "(default: %(default)s)")
    g.add_argument("--select-order", choices=ORDERS, default="masks",
                   help="auto: the ranking it prunes along: masks (ANP's) or patch (fastpurify's own, opt-in: ANP's "
                        "neurons ordered one by one by how much pruning each breaks a trigger reconstructed toward the "
                        "suspected target while the clean accuracy stays within 6 points; slower: a forward pass per "
                        "neuron and step) (default: %(default)s)")
    g.add_argument("--select-order-area", default=None,
                   help="auto with --select-order patch: the share of the pixels of the patch the order is built "
                        "with and the walk measures with, or auto: read from the model (the largest of 1, 2, 4 and "
                        "8 times --select-eps at which no other class's patch sends 0.4 of the images "
                        "there) (default: --select-eps, 0.01)")
    g.add_argument("--select-area-readings", type=int, default=None,
                   help="with --select-order-area auto: read the size with up to this many seeds of the patch "
                        "reconstruction and take the median (it stops at a majority: 3 agreeing of 5); one reading "
                        "is a draw where a class sits near the bar (default: 5)")
    g.add_argument("--select-correct-stats", action="store_true",
                   help="auto (fastpurify's own, opt-in): correct the pruned model's BatchNorm running statistics for "
                        "the pruning, measured on the clean images, and keep the correction only where the probe "
                        "still finds no backdoor on the corrected model (docs/anp-selection.md, tenth round)")
    g.add_argument("--select-hold", type=int, default=0, metavar="N",
                   help="auto (fastpurify's own, opt-in): stop only where the probe's share stays at or under "
                        "--max-target-share over that candidate and the N after it; a share can dip for one pruning "
                        "and come back with the next (docs/anp-selection.md, eleventh round) (default: %(default)s)")
    g.add_argument("--select-eps", type=float, default=None,
                   help="auto: the probe's bound: the L-inf bound on the pixels (inputs, 32/255), the patch's share "
                        "of the pixels (patch, 0.01) or the neurons' (neurons, 0.4) (default: the probe's)")
    g.add_argument("--select-steps", type=int, default=None,
                   help="auto: the probe's steps per candidate: PGD steps (inputs, 10), Adam steps of the trigger "
                        "reconstruction (patch, 100) or sign steps (neurons, 10) (default: the probe's)")
    rule = g.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, default=None, help="prune every neuron with mask <= T")
    rule.add_argument("--number", type=int, default=None, help="prune the K smallest masks")
    rule.add_argument("--fraction", type=float, default=None, help="prune this fraction of all neurons")
    rule.add_argument("--max-drop", type=float, default=None,
                      help="clean-data rule: the most pruning whose ACC on the clean set drops by at most this")
    g.add_argument("--sweep", choices=["thresholds", "numbers"], default="thresholds",
                   help="the table and curve: thresholds 0..0.9 (official) or numbers of neurons")
    g.add_argument("--sweep-values", default=None, help="comma-separated thresholds or numbers to sweep")
    add_engine_and_output_options(p, out="runs/anp")
    add_large_model_options(p, masks=True)
    return p


VALUE_DEFAULTS = {"threshold": 0.2}


def _rule(args) -> tuple[str, float | None]:
    """The pruning rule and its value: ``--select`` (its value from its option, or the default),
    else the rule of the value option given, else the default rule."""
    given = [(k, getattr(args, k)) for k in PRUNE_RULES if getattr(args, k) is not None]
    select = args.select.replace("-", "_") if args.select else (given[0][0] if given else DEFAULT_SELECT)
    if select == "auto":
        if given:
            raise InputError(f"--select auto chooses the number of neurons itself; drop --{given[0][0].replace('_', '-')}")
        return "auto", None
    if given and given[0][0] != select:
        raise InputError(f"--select {args.select} does not take --{given[0][0].replace('_', '-')}")
    value = getattr(args, select)
    if value is None:
        value = VALUE_DEFAULTS.get(select)
    if value is None:
        raise InputError(f"--select {args.select} needs its value: --{select.replace('_', '-')} VALUE")
    return select, value


def _sweep_values(args) -> list[float] | list[int] | None:
    if args.sweep_values is None:
        return None
    try:
        cast = float if args.sweep == "thresholds" else int
        return [cast(v) for v in args.sweep_values.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--sweep-values must be comma-separated {args.sweep}, got {args.sweep_values!r}") from None


def _attack(args, meta: dict, num_classes: int):
    from ..backdoor import make_attack

    recorded = meta.get("attack") or {}
    name = args.attack or recorded.get("name")
    if not name or name == "none":
        return None
    return make_attack(name, num_classes=num_classes,
                       target=args.target if args.target is not None else recorded.get("target", 0),
                       mode=args.mode or recorded.get("mode", "all2one"), seed=recorded.get("seed", 0))


def _check(args) -> None:
    for name in ("iterations", "batch_size", "clean_images", "steps", "seeds"):
        check_positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    for name in ("threshold", "fraction", "max_drop", "max_target_share", "acc_budget"):
        if getattr(args, name) is not None:
            check_fraction(getattr(args, name), "--" + name.replace("_", "-"), low_open=False, high_open=False)
    if args.number is not None and args.number < 0:
        raise InputError(f"--number must be >= 0, got {args.number}")
    if args.select_steps is not None:
        check_positive_int(args.select_steps, "--select-steps")
    if args.select_eps is not None and not args.select_eps > 0:
        raise InputError(f"--select-eps must be positive, got {args.select_eps}")
    if args.select_probe == "patch" and args.select_eps is not None and args.select_eps > 1:
        raise InputError(f"--select-eps is the patch's share of the pixels with --select-probe patch: give a value in "
                         f"(0, 1], got {args.select_eps}")
    if parse_anp_eps(args.eps) == "auto" and args.engine != "fast":
        raise InputError("--eps auto is read from the model by the fast engine; drop --engine reference or give a "
                         "number")
    if args.seeds > 1 and args.engine != "fast":
        raise InputError("--seeds K > 1 (a seed ensemble) runs on the fast engine; drop --engine reference")
    if args.select_order_area is not None:
        if args.select_order != "patch":
            raise InputError("--select-order-area is the patch of --select-order patch; give that too")
        args.select_order_area = parse_patch_area(args.select_order_area, "--select-order-area")
    if args.select_area_readings is not None:
        if args.select_order_area != "auto":
            raise InputError("--select-area-readings is how --select-order-area auto reads the size; give that too")
        check_positive_int(args.select_area_readings, "--select-area-readings")
    rule, _ = _rule(args)
    if args.select_correct_stats and rule != "auto":
        raise InputError("--select-correct-stats corrects the pruning the auto rule chooses; give it with --select auto")
    if args.select_hold:
        if rule != "auto":
            raise InputError("--select-hold is how the auto rule's walk stops; give it with --select auto")
        check_hold(args.select_hold, "--select-hold")
    if args.select_order != "masks":
        if rule != "auto":
            raise InputError("--select-order is the auto rule's ranking; give it with --select auto")
        if args.select_probe != "patch":
            raise InputError("--select-order patch orders the neurons by a reconstructed patch: it needs "
                             f"--select-probe patch, got --select-probe {args.select_probe}")


def run(args: argparse.Namespace) -> int:
    """The command; under torchrun every rank learns the masks together and rank 0 writes."""
    micro_batch_option(args)  # a clear error before any process group or data
    with process_group(args):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .. import __version__
    from .. import distributed as D
    from ..anp_eps import describe as describe_eps
    from ..backdoor import evaluate, weak_attack_warning
    from ..checkpoint import load_model, save_model
    from ..data import load_source
    from ..engines.anp import ANPDiverged
    from ..engines.anp import anp as fast_anp
    from ..engines.runtime import resolve_device
    from ..files import write_json, write_text
    from ..masks import save_masks
    from ..pruning import count_pruned, format_sweep, prune, prune_by_clean_accuracy, sweep
    from ..selection import DEFAULT_AREA_READINGS, choose_pruning
    from ..reference import anp as reference_anp

    _check(args)
    model, meta = load_model(args.model, args.arch, args.num_classes, args.in_channels,
                             trust_pickle=args.trust_pickle)
    if args.select_correct_stats:  # before any ANP iteration is spent
        from ..bn_statistics import require_batch_norms
        require_batch_norms(model, "--select-correct-stats", meta["arch"])
    size = args.size or (meta.get("image_size") or [None])[0]
    splits = load_source(args.data, size=size, channels=meta.get("in_channels"), seed=args.seed,
                         progress=False if args.no_progress else None)
    images, labels = splits.test
    n = args.clean_images
    if n >= images.shape[0]:
        raise InputError(f"--clean-images must be below {images.shape[0]}, the images of {splits.name}'s test split "
                         f"(the rest evaluate), got {n}")
    if int(labels.max()) >= meta["num_classes"]:
        raise InputError(f"the data has labels up to {int(labels.max())} but the model has {meta['num_classes']} "
                         "classes")
    clean, held_out = (images[:n], labels[:n]), (images[n:], labels[n:])
    attack = _attack(args, meta, meta["num_classes"])
    out = Path(args.out)
    settings = dict(eps=parse_anp_eps(args.eps), steps=args.steps, alpha=args.alpha, lr=args.lr,
                    momentum=args.momentum, iterations=args.iterations, batch_size=args.batch_size,
                    clamp_noise=not args.no_clamp_noise, augment=not args.no_augment, padding=args.padding,
                    flip=not args.no_flip, seed=args.seed, progress=not args.no_progress)
    main = D.is_main()
    if main:
        ranks = f" on {D.world_size()} processes" if D.world_size() > 1 else ""
        print(f"{meta['arch']} from {args.model}; {n} clean images of {splits.name} for ANP, {held_out[1].numel()} "
              f"to evaluate; {args.engine} engine, {args.iterations} iterations{ranks}")
    try:
        if args.engine == "fast":
            result = fast_anp(model, clean, device=args.device, precision=args.precision,
                              cuda_graph=False if args.no_cuda_graph else None,
                              channels_last=False if args.no_channels_last else None, tf32=not args.no_tf32,
                              mask_layers=args.mask_layers, micro_batch=micro_batch_option(args),
                              checkpoint=args.checkpoint, seeds=args.seeds, aggregate=args.aggregate, **settings)
        else:
            result = reference_anp(model.to(resolve_device(args.device)), clean, mask_layers=args.mask_layers,
                                   **settings)
    except ANPDiverged as err:
        if main:
            path = err.result.save(out / f"mask_values_iteration_{err.iteration - 1}.txt")
            print(f"fastpurify anp: error: {err}; wrote those masks to {path}", file=sys.stderr)
        return 3
    if not main:
        return 0  # the masks are the same on every rank; rank 0 prunes, evaluates and writes
    model = model.cpu()
    result.save(out / "mask_values.txt")
    result.save(out / "masks.json")
    for k, member in enumerate(result.members):  # a seed ensemble: every member's own masks too
        save_masks(member, out / "members" / f"masks_seed{args.seed + k}.json", settings={"seed": args.seed + k})
    print(f"ANP: {args.iterations} iterations in {result.seconds:.1f} s "
          f"({args.iterations / result.seconds:.1f} it/s) on {result.engine.get('device', args.device or 'cpu')}"
          + peak_text(result.engine))
    print(f"masked {result.num_neurons} neurons in {len(result.masks)} layers" + _paths_text(result.engine))
    if "eps_auto" in result.settings:
        print(describe_eps(result.settings["eps_auto"]))

    rule, value = _rule(args)
    selection = None
    if rule == "auto":
        selection = choose_pruning(model, result.masks, *clean, max_target_share=args.max_target_share,
                                   max_acc_drop=args.acc_budget, probe=args.select_probe, eps=args.select_eps,
                                   steps=args.select_steps, order=args.select_order,
                                   order_area=args.select_order_area,
                                   area_readings=args.select_area_readings or DEFAULT_AREA_READINGS,
                                   correct_statistics=args.select_correct_stats, hold=args.select_hold,
                                   progress=not args.no_progress)
        k = selection.pruned
        pruned_model = selection.prune(model)
        print(f"auto pruning: {selection.reason}")
    elif rule == "max_drop":
        choice = prune_by_clean_accuracy(model, result.masks, *clean, max_drop=value)
        pruned_model, k = choice.model, choice.point.pruned
    else:
        k = count_pruned(result.masks, **{rule: value})
        pruned_model = prune(model, result.masks, number=k)
    by = "number" if args.sweep == "numbers" else "threshold"
    values = _sweep_values(args)
    points = sweep(model, result.masks, *held_out, attack=attack,
                   **({"numbers": values or _default_numbers(result.num_neurons)} if by == "number"
                      else {"thresholds": values}))
    table = format_sweep(points)
    write_text(out / "sweep.txt", table)
    before, after = evaluate(model, *held_out, attack), evaluate(pruned_model, *held_out, attack)
    warning = weak_attack_warning(before.get("asr"))
    save_model(pruned_model, out / "pruned_model.safetensors",
               metadata={**meta, "pruned": {"neurons": k, "rule": rule, "value": value,
                                            **({"statistics": "corrected"} if selection is not None
                                               and selection.statistics is not None else {})}})
    figures = _figures(args, result, points, rule, value, by, out, selection)
    report = {"fastpurify": __version__, "command": "anp", "model": str(args.model), "arch": meta["arch"],
              "data": splits.name, "clean_images": n, "evaluated_images": int(held_out[1].numel()),
              "engine": args.engine, "engine_info": result.engine, "settings": result.settings,
              "seconds": round(result.seconds, 3), "iterations_per_second": round(args.iterations / result.seconds, 2),
              "final_loss": result.loss[-1], "num_neurons": result.num_neurons,
              "peak_memory_bytes": result.engine.get("peak_memory_bytes"),
              "peak_memory_kind": result.engine.get("peak_memory_kind"),
              "pruning": {"rule": rule, "value": value, "pruned": k}, "before": before, "after": after,
              **({"warning": warning} if warning else {}),
              "selection": None if selection is None else selection.as_dict(),
              "ensemble": None if not result.members else {
                  "seeds": [args.seed + i for i in range(args.seeds)], "aggregate": args.aggregate,
                  "final_loss": [losses[-1] for losses in result.member_loss]},
              "attack": None if attack is None else repr(attack), "figures": figures,
              "sweep": [{"by": p.by, "value": p.value, "pruned": p.pruned, "acc": p.acc, "asr": p.asr}
                        for p in points]}
    write_json(out / "report.json", report)
    print(table, end="")
    asr = lambda m: f", ASR {m['asr']:.1%}" if "asr" in m else ""  # noqa: E731
    print(f"pruned {k} of {result.num_neurons} neurons ({rule}{'' if value is None else f' {value}'}); on {held_out[1].numel()} held-out images: "
          f"before ACC {before['acc']:.1%}{asr(before)}; after ACC {after['acc']:.1%}{asr(after)}")
    if warning:
        print(f"warning: {warning}")
    print(f"wrote {out}/mask_values.txt, masks.json, sweep.txt, pruned_model.safetensors, report.json"
          + "".join(f", {Path(f).name}" for f in figures))
    return 0


def _default_numbers(total: int) -> list[int]:
    step = max(1, total // 40)
    return list(range(0, min(total, step * 20) + 1, step))


def _figures(args, result, points, rule, value, by, out: Path, selection=None) -> list[str]:
    from ..plots import mask_distribution, pruning_curve, selection_curve

    if not plotting_enabled(args):
        return []
    threshold = value if rule == "threshold" else None
    swept = points[1:]
    xs = [p.value if by == "threshold" else p.pruned for p in swept]
    files = [mask_distribution(result.masks, out / "mask_distribution.png", threshold=threshold),
             pruning_curve(xs, [p.acc for p in swept], [p.asr for p in swept], out / "pruning_curve.png",
                           xlabel="pruning threshold (mask <= t)" if by == "threshold" else "neurons pruned")]
    if selection is not None:
        files.append(selection_curve(selection, out / "selection.png"))
    return [str(f) for f in files]


def _paths_text(engine: dict) -> str:
    """How the fast engine perturbed the layers (fused ops, the layers' own forward, Eq. 3), if it says."""
    paths = engine.get("layer_paths")
    if not paths:
        return ""
    names = {"fused": "fused", "generic": "own forward (generic path)", "conv_linear": "Conv/Linear (Eq. 3)"}
    return " (" + ", ".join(f"{count} {names.get(path, path)}" for path, count in paths.items()) + ")"
