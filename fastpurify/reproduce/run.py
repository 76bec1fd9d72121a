"""One reproduction end to end: load the data, split it as the papers do, train or reuse each
(attack, seed) subject, run the defense on it, and write the table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import __version__
from ..backdoor import implant_warning
from ..data import load_source
from ..engines.runtime import resolve_device
from ..files import write_json
from ..purification import default_exclude_low_loss, default_lr
from .config import CONTROL, ReproduceConfig, paper_config
from .defenses import run_anp, run_pbe
from .papers import load_published
from .subjects import (SplitData, cached_subject, clean_count, epochs_within, get_subject, split_data,
                       subject_key, subjects_folder)
from .table import write_table


def reproduce(defense: str, data: str = "cifar10-jpeg", *, out: str | Path, budget: float | None = None,
              device: torch.device | str | None = None, precision: str = "fp32", subject_cache: str | Path | None = None,
              paper_numbers: str | Path | None = None, progress: bool = True, **overrides) -> dict:
    """Reproduce ``defense`` ("anp" or "pbe") on ``data`` (any ``--data`` source; default the
    CIFAR-10 JPEG copy) and write ``table.md``, ``table.json`` and ``table.png`` to ``out``.

    ``overrides``: any :class:`ReproduceConfig` field (attacks, seeds, arch, rate, train_images,
    clean_images, anp_iterations, pbe_settings, ...) and any :class:`TrainRecipe` field (epochs,
    batch_size, lr, ...) for the subjects' training (default: the device's recipe,
    :func:`default_recipe`). ``budget``: seconds for training the
    subjects not cached yet; their epochs are capped to fit (measured on a few batches first).
    ``precision``: the defenses' ("fp32"/"bf16"); the subjects train with their recipe's.
    Returns the contents of ``table.json``.
    """
    device = resolve_device(device)
    config = paper_config(defense, device.type, **overrides)
    if budget is not None and not budget > 0:
        from ..validation import InputError
        raise InputError(f"--budget must be a positive number of seconds, got {budget}")
    if paper_numbers is not None:
        published = load_published(paper_numbers, defense)
    else:
        published = {}
    out = Path(out)
    cache = subjects_folder(subject_cache)
    started = time.perf_counter()
    splits = load_source(data, progress=progress)
    split = split_data(splits, config)
    work = [(attack, seed) for attack in config.attacks for seed in range(config.seeds)]
    recipe, budget_info = _recipe_for(split, config, work, budget, device, cache)
    runs = []
    for i, (attack, seed) in enumerate(work, 1):
        what = "no poison: the clean control" if attack == CONTROL else f"rate {config.rate:g}"
        print(f"[{i}/{len(work)}] {attack}, seed {seed}: subject ({config.arch}, {what})", flush=True)
        subject = get_subject(split, config, attack, seed, recipe=_recipe_of(split, config, attack, seed, recipe, cache),
                              device=device, cache=cache, progress=progress)
        b = subject.before
        how = "cached" if subject.record["cached"] else f"trained in {subject.record['train_seconds']:.0f} s"
        print(f"  subject {how}: ACC {b['acc']:.1%}, ASR {_pct(b.get('asr'))}", flush=True)
        run = {"attack": attack, "seed": seed, "subject": subject.record,
               "before": {"acc": b["acc"], "asr": b.get("asr")}}
        warning = implant_warning(b.get("asr"))
        if warning:
            run["warning"] = warning
            print(f"  warning: {warning}", flush=True)
        kw = dict(device=device, precision=precision, seed=seed, progress=progress)
        if defense == "anp":
            run["anp"] = result = run_anp(subject, split, config, **kw)
            rules = [(f"threshold {config.threshold}", result["threshold"]), ("clean rule", result["clean_rule"])]
            if result["auto"] is not None:
                rules.append(("auto", result["auto"]))
            print(f"  ANP {result['mask_seconds']:.1f} s; " + "; ".join(
                f"{label}: pruned {r['pruned']}, ACC {r['acc']:.1%}, ASR {_pct(r['asr'])}" for label, r in rules),
                flush=True)
        else:
            run["pbe"] = result = run_pbe(subject, split, config, **kw)
            for setting, r in result.items():
                print(f"  PBE {setting} {r['seconds']:.1f} s: ACC {r['acc']:.1%}, ASR {_pct(r['asr'])}", flush=True)
        runs.append(run)
        write_json(out / "runs" / f"{attack}-seed{seed}.json", run)
    header = {"data": split.name, "lines": _header_lines(config, split, recipe, budget_info, device, precision)}
    extra = {"fastpurify": __version__, "data": split.name, "config": config.as_dict(), "device": str(device),
             "precision": precision, "budget": budget_info, "subject_cache": str(cache),
             "seconds": round(time.perf_counter() - started, 1)}
    files = write_table(out, defense, runs, header, published, extra)
    print((out / "table.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files))
    return json.loads((out / "table.json").read_text())


def _pct(value: float | None) -> str:
    """A fraction in percent; "n/a" for the clean control's ASR."""
    return "n/a" if value is None else f"{value:.1%}"


def _recipe_of(split: SplitData, config: ReproduceConfig, attack: str, seed: int, capped, cache: Path):
    """The full recipe when that subject is cached already, else the (possibly capped) one."""
    full = config.recipe
    return full if cached_subject(cache, subject_key(split, config, attack, seed, full)) else capped


def _recipe_for(split: SplitData, config: ReproduceConfig, work: list, budget: float | None, device: torch.device,
                cache: Path):
    """The recipe for subjects still to train: capped by ``budget`` when one is given."""
    todo = [w for w in work if not cached_subject(cache, subject_key(split, config, *w, config.recipe))]
    if budget is None or not todo:
        return config.recipe, None
    recipe, info = epochs_within(budget, split, config, config.recipe, device, len(todo))
    print(f"budget {budget:g} s for {len(todo)} subjects: {info['probe_seconds_per_epoch']:.1f} s per epoch, "
          f"{recipe.epochs} of {config.recipe.epochs} epochs", flush=True)
    return recipe, info


def _header_lines(config: ReproduceConfig, split: SplitData, recipe, budget_info, device, precision) -> list:
    r = recipe
    lines = [
        ("subjects", f"{config.arch}, all-to-one to class {config.target}, poison rate {config.rate:g}, trained on "
                     f"{split.train[1].numel()} images ({1 - config.reserve_fraction:.0%} of "
                     f"{split.full_train_size}); {r.epochs} epochs, batch {r.batch_size}, {r.schedule} lr {r.lr:g}, "
                     f"{r.precision}"),
        ("defender", f"{clean_count(config, split.full_train_size)} clean images from the held-out "
                     f"{config.reserve_fraction:.0%}"),
        ("evaluation", f"{split.test[1].numel()} test images"),
    ] + ([("none", "the clean control: the same model, data and training without poison (ASR n/a)")]
         if CONTROL in config.attacks else []) + [
        ("device", f"{device}, defenses in {precision}"),
    ]
    if config.defense == "anp":
        ensemble = f", mean mask of a {config.anp_seeds}-seed ensemble" if config.anp_seeds > 1 else ""
        eps = "auto (read from each subject)" if config.anp_eps == "auto" else f"{config.anp_eps:g}"
        lines.append(("ANP", f"{config.anp_iterations} iterations, batch {config.anp_batch_size}, "
                             f"eps {eps}, alpha 0.2, lr 0.2{ensemble}; pruned at threshold "
                             f"{config.threshold:g}, by the clean-data rule (clean ACC drop <= "
                             f"{config.max_drop * 100:g} points on the defender's images) and by "
                             "the trigger-free auto rule (docs/anp-selection.md)"
                             + _order_text(config)))
    else:
        if config.pbe_recipe:
            rounds = "the authors' rounds (--pbe-recipe authors)"
        elif config.pbe_adv_epochs is None:
            rounds = "fastpurify.pbe's rounds (no-clean: the authors'; clean: 3 + 17 epochs)"
        else:
            rounds = f"{config.pbe_adv_epochs} adversarial + {config.pbe_clean_epochs} clean epochs per round"
        no_clean = default_lr(True, config.pbe_initial)
        excluded = (default_exclude_low_loss(True, config.pbe_initial) if config.pbe_exclude_low_loss is None
                    else config.pbe_exclude_low_loss)
        lr = (f"lr {no_clean:g} no-clean, {default_lr(False, config.pbe_initial):g} clean"
              if config.pbe_lr is None else f"lr {config.pbe_lr:g}")
        lines.append(("PBE", f"eps {config.pbe_eps * 255:.3g}/255, {rounds}, {lr}; settings "
                             f"{', '.join(config.pbe_settings)}; no-clean schedule "
                             f"{', '.join(f'{f:g}' for f in config.pbe_schedule)}, round 0 {config.pbe_initial}"
                             + (f", the best-fitted {excluded:g} kept out" if excluded else "")))
    if budget_info:
        lines.append(("budget", f"{budget_info['budget_seconds']:g} s for {budget_info['subjects']} subjects: "
                                f"{budget_info['epochs_used']} of {budget_info['epochs_asked']} epochs"))
    return lines


def _order_text(config: ReproduceConfig) -> str:
    """The auto rule's ranking, as the ANP line says it: nothing for ANP's masks."""
    stats = ", BatchNorm statistics corrected where the check passes (--select-correct-stats)" \
        if config.select_correct_stats else ""
    if config.select_hold:
        stats += f", its stop held over {config.select_hold} more candidate{'s' if config.select_hold > 1 else ''}" \
                 " (--select-hold)"
    if config.select_order != "patch":
        return stats
    area = config.select_order_area
    patch = "" if area is None else f", its patch {area if area == 'auto' else format(area, 'g')}"
    return f", along the trigger-guided order (--select-order patch{patch})" + stats
