"""PBE: the fast engine against the reference, in one process, on the same device, model and data.

Three measurements, all on PreAct-ResNet-18 with CIFAR shapes (synthetic pixels and a freshly
initialised model: the speed does not depend on them):

1. **One round** (the variants). A round is PBE with a clean extra set of ``num_images``
   images: PGD-7 examples of the set (eps 6/255, generated once per round, the paper's step 1a),
   ``adv_epochs`` epochs of fine-tuning on them, then ``clean_epochs`` epochs on the set itself
   (batch 128, crop + flip). This is also the work of one progressive round; the default size,
   2,500 images, is round 0's extra set on 50,000 training images. Each timed step is one whole
   ``pbe(...)`` call (set-up, graph capture and the round), between two device synchronisations,
   after ``warmup`` untimed calls; the round's own time (``report.seconds``) is recorded beside it.
   Variants: ``reference`` (:func:`fastpurify.reference.pbe`, eager), ``reference-compile`` (the
   reference on ``torch.compile(model)``; on CPU only when named), ``fast-eager``
   (:func:`fastpurify.pbe` without CUDA graphs or channels_last: frozen-weight fused PGD,
   device-side batches, fused SGD), ``fast`` (as it runs by default: adds channels_last — on CUDA,
   and on the CPU for float32 models — and on CUDA the graphs of the training step and of the PGD
   loop and TF32), ``fast-bf16`` (CUDA: ``fast`` under
   bfloat16 autocast), ``fast-native-norms`` (CUDA: ``fast`` with PGD through PyTorch's eval
   BatchNorms instead of fastpurify's fused eval kernels, ``fused_norms=False``),
   ``reference-autotune`` and ``fast-autotune`` (CUDA: the two with cuDNN autotuning, each in a
   thread of its own, :func:`.common.in_autotune_thread`; fastpurify's engines do not turn it on).
2. **Scoring**: one pass over ``score_images`` images that gives each its cosine similarity
   between the infected model's logits (computed beforehand, once, as both implementations do)
   and the current model's (a seeded perturbation of the infected one stands in for the
   fine-tuned model): the reference's ``predict_logits`` + ``cosine_scores`` against the
   engine's chunked forward with the fused ``logits_cosine``; the largest score gap is recorded.
3. **The full run** (``full_images``, optional): the progressive setting without clean data
   (schedule 0.05, 0.2, 0.5, 0.7; 3 + 17 epochs per round) on that many images, the reference
   against ``fastpurify.pbe`` end to end, once each, with the seconds of every round.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable

import torch
import torch.nn as nn

from ..engines.pbe import PBEEngine
from ..engines.pbe import pbe as fast_pbe
from ..engines.runtime import resolve_device, tf32_enabled, use_channels_last
from ..inference import predict_logits
from ..purification import DEFAULT_SCHEDULE, plan_pbe
from ..ranking import cosine_scores
from ..reference import pbe as reference_pbe
from ..validation import check_positive_int
from .common import (AUTOTUNED_VARIANTS, Timing, choose_variants, compile_model, environment, run_variants,
                     skipped_lines, synthetic_subject, table, time_variant, timed, untuned)

VARIANTS = ("reference", "reference-compile", "fast-eager", "fast", "fast-bf16", "fast-native-norms",
            *AUTOTUNED_VARIANTS)
CUDA_ONLY = ("fast-bf16", "fast-native-norms", *AUTOTUNED_VARIANTS)
CPU_DEFAULT_SKIP = ("reference-compile",)
SCORE_VARIANTS = ("reference", "fast", "fast-bf16")
PBE_KW = dict(eps=6 / 255, alpha=None, pgd_steps=7, random_start=False, regenerate="round", lr=1e-3, momentum=0.9,
              weight_decay=5e-4, augment=True, padding=4, flip=True, seed=0)


def _fast_options(name: str) -> dict:
    if name == "fast-eager":
        return dict(cuda_graph=False, channels_last=False)
    if name == "fast-native-norms":
        return dict(fused_norms=False)
    return dict(precision="bf16") if name == "fast-bf16" else {}


def round_call(name: str, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], device: torch.device, *,
               batch_size: int = 128, adv_epochs: int = 3, clean_epochs: int = 17,
               pgd_batch_size: int | None = None) -> Callable:
    """A no-argument call of the variant's PBE on the clean extra set ``data``, returning the report.
    ``pgd_batch_size``: the fast engine's PGD chunk (the reference attacks a batch at a time)."""
    common = dict(PBE_KW, batch_size=batch_size, adv_epochs=adv_epochs, clean_epochs=clean_epochs, progress=False)
    if name.startswith("reference"):
        net = copy.deepcopy(model).to(device)
        if name == "reference-compile":
            net = compile_model(net)
        return lambda: reference_pbe(net, clean_data=data, **common).report
    return lambda: fast_pbe(model, clean_data=data, device=device, pgd_batch_size=pgd_batch_size,
                            **_fast_options(name), **common).report


def time_rounds(name: str, call: Callable, device: torch.device, *, warmup: int, repeats: int,
                images: int) -> Timing:
    """Whole calls timed one per block; the report's round seconds kept in the note."""
    reports = []

    def step():
        reports.append(call())
    timing = time_variant(name, step, device, warmup=warmup, iterations=1, repeats=repeats, items=images,
                          unit="images")
    rounds = [r.seconds for r in reports[warmup:]]
    engine = reports[-1].engine
    flags = [k for k in ("cuda_graph", "channels_last", "tf32") if engine.get(k)]
    if engine.get("precision") == "bf16":
        flags.append("bf16")
    timing.note = f"round {statistics.median(rounds):.3f} s" + (f"; {', '.join(flags)}" if flags else "")
    return timing


def profile_variants(names: tuple[str, ...], *, arch: str = "preact_resnet18", batch_size: int = 128,
                     num_images: int = 2500, image_size: int = 32, adv_epochs: int = 1, clean_epochs: int = 2,
                     pgd_batch_size: int | None = None, device=None) -> dict:
    """Each variant's PBE call under ``torch.profiler`` (:func:`.profile.profile_step`, one
    untimed call first): where a round's time goes, the PGD examples against the fine-tuning's
    convolutions (weight gradients included), BatchNorms and optimiser. A shorter round than the
    timed one (``adv_epochs`` + ``clean_epochs``) keeps the trace small; its set-up is included,
    as in the timed calls."""
    from .profile import profile_step

    device = resolve_device(device)
    model, images, labels = synthetic_subject(arch, num_images, device, image_size=image_size)
    return {name: profile_step(round_call(name, model, (images, labels), device, batch_size=batch_size,
                                          adv_epochs=adv_epochs, clean_epochs=clean_epochs,
                                          pgd_batch_size=pgd_batch_size), device, iterations=1, warmup=1)
            for name in names}


def fine_tuned_stand_in(model: nn.Module, scale: float = 0.5, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every floating parameter moved by seeded noise (``scale`` times its
    mean magnitude): a stand-in for the model after a round of fine-tuning, so the scores differ
    from 1 and the comparison with the reference means something (the speed does not depend on it)."""
    current = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in current.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * scale * p.abs().mean())
    return current


def score_step(name: str, current: nn.Module, infected: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
               device: torch.device, *, score_batch_size: int = 1024) -> Callable[[], torch.Tensor]:
    """A no-argument scoring pass of the variant over ``images``: each image's cosine between the
    ``infected`` logits (computed beforehand, once, as both implementations do) and the
    ``current`` model's. The reference: ``predict_logits`` + ``cosine_scores``; the engine: its
    chunked forward with the fused cosine (channels_last by default, TF32 on CUDA, as ``fastpurify.pbe``)."""
    if name == "reference":
        net = copy.deepcopy(current).to(device)
        return lambda: cosine_scores(infected, predict_logits(net, images))
    plan = plan_pbe(current, None, (images, labels), device=device, poison_indices=None, test_data=None, attack=None,
                    batch_size=128, adv_epochs=3, clean_epochs=17, schedule=DEFAULT_SCHEDULE, **PBE_KW)
    cuda = device.type == "cuda"
    engine = PBEEngine(current, plan, device=device, channels_last=use_channels_last(None, device, images),
                       cuda_graph=False, precision="bf16" if name == "fast-bf16" else "fp32", pgd_batch_size=512,
                       score_batch_size=score_batch_size)

    def step():
        with tf32_enabled(cuda):
            return engine.scores(plan.images, infected)
    return step


def scoring(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, *,
            variants: tuple[str, ...], warmup: int, repeats: int, score_batch_size: int = 1024,
            progress: Callable[[str], None] | None = print) -> dict:
    """One scoring pass over ``images`` per variant, timed, with :func:`fine_tuned_stand_in` as the
    current model; plus each variant's largest score difference from the reference."""
    infected = predict_logits(copy.deepcopy(model).to(device), images)
    current = fine_tuned_stand_in(model)
    scores: dict[str, torch.Tensor] = {}

    def measure(name):
        step = score_step(name, current, infected, images, labels, device, score_batch_size=score_batch_size)
        timing = time_variant(name, step, device, warmup=warmup, iterations=1, repeats=repeats,
                              items=images.shape[0], unit="images")
        scores[name] = step()
        return timing

    timings, skipped = run_variants(variants, measure, device, progress=progress)
    out = {"images": int(images.shape[0]), "score_batch_size": score_batch_size,
           "variants": [t.as_dict() for t in timings], "skipped": skipped}
    if "reference" in scores:
        ref = scores["reference"].double()
        out["score_range"] = [round(float(ref.min()), 6), round(float(ref.max()), 6)]
        out["max_score_diff"] = {k: float((v.double() - ref).abs().max()) for k, v in scores.items()
                                 if k != "reference"}
    return out


def full_run(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, *,
             batch_size: int = 128, adv_epochs: int = 3, clean_epochs: int = 17,
             schedule: tuple[float, ...] = DEFAULT_SCHEDULE, variants: tuple[str, ...] = ("reference", "fast"),
             pgd_batch_size: int | None = None, progress: Callable[[str], None] | None = print) -> dict:
    """The progressive PBE run without clean data, each variant once end to end."""
    kw = dict(PBE_KW, batch_size=batch_size, adv_epochs=adv_epochs, clean_epochs=clean_epochs, schedule=schedule,
              progress=False)
    runs, last_sets = {}, {}
    for name in variants:
        if progress:
            progress(f"  full run: {name} ...")
        if name == "reference":
            net = copy.deepcopy(model).to(device)
            (_, report), seconds = timed(lambda: reference_pbe(net, (images, labels), **kw), device)
        else:
            (_, report), seconds = timed(lambda: fast_pbe(model, (images, labels), device=device,
                                                          pgd_batch_size=pgd_batch_size, **_fast_options(name),
                                                          **kw), device)
        runs[name] = {"wall_seconds": round(seconds, 3), "round_seconds_total": round(report.seconds, 3),
                      "rounds": [{"round": r.round, "fraction": r.fraction, "size": r.size,
                                  "seconds": round(r.seconds, 3)} for r in report.rounds],
                      "engine": report.engine}
        last_sets[name] = report.rounds[-1].indices
    out = {"images": int(images.shape[0]), "schedule": list(schedule), "adv_epochs": adv_epochs,
           "clean_epochs": clean_epochs, "runs": runs}
    if "reference" in runs:
        for name in runs:
            if name != "reference":
                runs[name]["speedup"] = round(runs["reference"]["wall_seconds"] / runs[name]["wall_seconds"], 3)
                same = torch.isin(last_sets[name], last_sets["reference"]).float().mean()
                runs[name]["last_extra_set_overlap"] = round(float(same), 4)
    return out


def run_pbe_benchmark(*, arch: str = "preact_resnet18", batch_size: int = 128, num_images: int = 2500,
                      image_size: int = 32, channels: int = 3, num_classes: int = 10, device=None,
                      variants: tuple[str, ...] | None = None, warmup: int = 1, repeats: int = 3,
                      adv_epochs: int = 3, clean_epochs: int = 17, pgd_batch_size: int | None = None,
                      score_images: int = 0,
                      full_images: int = 0, progress: Callable[[str], None] | None = print) -> dict:
    """Time one round per variant, then (``score_images``) one scoring pass, then
    (``full_images``) the full progressive run; return the result dict (JSON-ready).
    ``pgd_batch_size``: the fast engine's PGD chunk in the timed round (None: the engine's
    default, 512 on CUDA and the training batch on a CPU)."""
    device = resolve_device(device)
    for name, value in (("batch_size", batch_size), ("num_images", num_images), ("repeats", repeats)):
        check_positive_int(value, name)
    variants = choose_variants(variants, VARIANTS, device, cuda_only=CUDA_ONLY, cpu_default_skip=CPU_DEFAULT_SKIP)
    model, images, labels = synthetic_subject(arch, max(num_images, score_images, full_images), device,
                                              num_classes=num_classes, channels=channels, image_size=image_size)
    data = images[:num_images], labels[:num_images]

    def measure(name):
        call = round_call(untuned(name), model, data, device, batch_size=batch_size, adv_epochs=adv_epochs,
                          clean_epochs=clean_epochs, pgd_batch_size=pgd_batch_size)
        return time_rounds(name, call, device, warmup=warmup, repeats=repeats, images=num_images)

    timings, skipped = run_variants(variants, measure, device, progress=progress)
    result = {"benchmark": "pbe", "environment": environment(device),
              "settings": dict(arch=arch, batch_size=batch_size, num_images=num_images, image_size=image_size,
                               channels=channels, num_classes=num_classes, warmup=warmup, repeats=repeats,
                               setting="clean extra set (one round)", adv_epochs=adv_epochs,
                               clean_epochs=clean_epochs, pgd_batch_size=pgd_batch_size, **PBE_KW),
              "variants": [t.as_dict() for t in timings], "skipped": skipped}
    if score_images:
        if progress:
            progress(f"  scoring {score_images} images ...")
        names = tuple(v for v in SCORE_VARIANTS if device.type == "cuda" or v not in CUDA_ONLY)
        result["scoring"] = scoring(model, images[:score_images], labels[:score_images], device, variants=names,
                                    warmup=max(1, warmup), repeats=repeats, progress=progress)
    if full_images:
        result["full"] = full_run(model, images[:full_images], labels[:full_images], device, batch_size=batch_size,
                                  adv_epochs=adv_epochs, clean_epochs=clean_epochs, pgd_batch_size=pgd_batch_size,
                                  progress=progress)
    return result


def format_table(result: dict) -> str:
    """Text tables: seconds per round, images per second of the scoring pass, the full run."""
    env, s = result["environment"], result["settings"]
    lines = [f"PBE round (clean extra set of {s['num_images']} images of {s['image_size']}px, PGD-{s['pgd_steps']}, "
             f"{s['adv_epochs']} + {s['clean_epochs']} epochs, batch {s['batch_size']}) on {s['arch']}; "
             f"{env['device']} (torch {env['torch']}, triton {env['triton']}); median of {s['repeats']} calls",
             *table(result["variants"], rate_key="images_per_second", time_header="s/round", rate_header="img/s",
                    scale=1e-3), *skipped_lines(result)]
    if "scoring" in result:
        sc = result["scoring"]
        lines += [f"scoring pass over {sc['images']} images", *table(sc["variants"], rate_key="images_per_second",
                                                                      time_header="ms/pass", rate_header="img/s"),
                  *skipped_lines(sc)]
        for name, gap in sc.get("max_score_diff", {}).items():
            lines.append(f"{name} vs reference scores: max |diff| {gap:.3g}")
    if "full" in result:
        f = result["full"]
        lines.append(f"full progressive run on {f['images']} images (schedule {f['schedule']}):")
        for name, r in f["runs"].items():
            per_round = ", ".join(f"{x['seconds']:.1f}" for x in r["rounds"])
            extra = f"; {r['speedup']:.2f}x, last extra sets overlap {r['last_extra_set_overlap']:.1%}" \
                if "speedup" in r else ""
            lines.append(f"  {name:<10} {r['wall_seconds']:.1f} s (rounds {per_round} s){extra}")
    return "\n".join(lines)
