"""The defenses of a reproduction, run on one subject with the papers' settings: ANP (masks from
the fast engine, pruned by the paper's threshold and by the clean-data rule) and PBE (with a
clean extra set, and progressively without clean data). Every number is measured on the test
split; every time is the defense's own (evaluation excluded)."""

from __future__ import annotations

import time

import torch

from ..anp_eps import auto_eps
from ..backdoor import evaluate
from ..engines.anp import anp as fast_anp
from ..engines.pbe import pbe as fast_pbe
from ..pruning import count_pruned, prune, prune_by_clean_accuracy
from ..selection import choose_pruning
from .config import ReproduceConfig
from .subjects import SplitData, Subject, defender_clean


def _metrics(m: dict) -> dict:
    return {"acc": m["acc"], "asr": m.get("asr")}


def run_anp(subject: Subject, data: SplitData, config: ReproduceConfig, *, device: torch.device,
            precision: str, seed: int, progress: bool) -> dict:
    """ANP masks on the defender's clean images (``anp_seeds`` > 1: a seed ensemble's mean mask),
    then three prunings: every neuron with mask <= ``threshold`` (the paper), the clean-data rule
    (the most neurons whose clean accuracy on the defender's images drops by at most
    ``max_drop``) and the trigger-free ``auto`` rule (:func:`fastpurify.selection.choose_pruning`,
    its defaults, along ``select_order``); ACC / ASR of each on the test split. ``eps_reading``: what ``eps="auto"``
    reads from the subject (:mod:`fastpurify.anp_eps`), also where the run used a given eps — a
    few passes over the defender's images, so every run says where its model puts the bound."""
    clean = defender_clean(data, config)
    result = fast_anp(subject.model, clean, eps=config.anp_eps, iterations=config.anp_iterations,
                      batch_size=config.anp_batch_size, seed=seed, device=device, precision=precision,
                      progress=progress, seeds=config.anp_seeds)
    start = time.perf_counter()
    by_threshold = prune(subject.model, result.masks, threshold=config.threshold)
    threshold_seconds = time.perf_counter() - start
    choice = prune_by_clean_accuracy(subject.model, result.masks, *clean, max_drop=config.max_drop)
    rule_seconds = time.perf_counter() - start - threshold_seconds
    pruned = count_pruned(result.masks, threshold=config.threshold)
    auto = None
    if config.auto_rule:
        start = time.perf_counter()
        selection = choose_pruning(subject.model, result.masks, *clean, order=config.select_order,
                                   order_area=config.select_order_area,
                                   correct_statistics=config.select_correct_stats, hold=config.select_hold,
                                   progress=progress)
        auto = {"pruned": selection.pruned, "reason": selection.reason,
                "statistics": selection.statistics_used,
                "seconds": round(time.perf_counter() - start, 3), "settings": selection.settings,
                "order": None if selection.order is None else selection.order.as_dict(),
                **_metrics(evaluate(selection.prune(subject.model), *data.test, subject.attack))}
    return {
        "clean_images": int(clean[1].numel()),
        "mask_seconds": round(result.seconds, 3),
        "engine": {k: result.engine.get(k) for k in ("name", "device", "backend", "cuda_graph", "precision")},
        "settings": {k: result.settings[k] for k in ("eps", "alpha", "lr", "iterations", "batch_size")},
        "eps_reading": result.settings.get("eps_auto") or auto_eps(
            subject.model, *clean, mask_layers=result.settings["mask_layers"], batch_size=config.anp_batch_size,
            device=device, seed=seed),
        "num_neurons": result.num_neurons,
        "threshold": {"value": config.threshold, "pruned": pruned, "seconds": round(threshold_seconds, 3),
                      **_metrics(evaluate(by_threshold, *data.test, subject.attack))},
        "clean_rule": {"max_drop": config.max_drop, "pruned": choice.point.pruned, "threshold": choice.point.value,
                       "seconds": round(rule_seconds, 3),
                       **_metrics(evaluate(choice.model, *data.test, subject.attack))},
        "auto": auto,
        "seeds": config.anp_seeds,
    }


def run_pbe(subject: Subject, data: SplitData, config: ReproduceConfig, *, device: torch.device,
            precision: str, seed: int, progress: bool) -> dict:
    """PBE in each setting asked for: ``clean`` (one round on the defender's clean extra set; the
    paper's AFT) and ``no-clean`` (the progressive rounds on the poisoned training set, with the
    ground truth used only to report each extra set's poisoned share)."""
    kw = dict(test_data=data.test, attack=subject.attack, eps=config.pbe_eps, adv_epochs=config.pbe_adv_epochs,
              clean_epochs=config.pbe_clean_epochs, recipe=config.pbe_recipe, lr=config.pbe_lr, seed=seed,
              device=device, precision=precision, progress=progress)
    out = {}
    if "clean" in config.pbe_settings:
        clean = defender_clean(data, config)
        _, report = fast_pbe(subject.model, clean_data=clean, **kw)
        last = report.rounds[-1]
        out["clean"] = {"clean_images": int(clean[1].numel()), "seconds": round(report.seconds, 3),
                        "acc": last.acc, "asr": last.asr, "engine": report.engine.get("device")}
    if "no-clean" in config.pbe_settings:
        images, labels, poisoned = subject.training_set(data)
        _, report = fast_pbe(subject.model, train_data=(images, labels), poison_indices=poisoned,
                             schedule=config.pbe_schedule, initial=config.pbe_initial,
                             exclude_low_loss=config.pbe_exclude_low_loss, **kw)
        last = report.rounds[-1]
        out["no-clean"] = {"train_images": int(labels.numel()), "seconds": round(report.seconds, 3),
                           "acc": last.acc, "asr": last.asr, "engine": report.engine.get("device"),
                           "adversarial_labels": report.adversarial_labels,
                           "rounds": [{"fraction": r.fraction, "size": r.size, "adv_acc": r.adv_acc,
                                       "adv_asr": r.adv_asr, "acc": r.acc, "asr": r.asr,
                                       "poisoned_fraction": r.poisoned_fraction,
                                       "average_precision": r.average_precision} for r in report.rounds]}
    return out
