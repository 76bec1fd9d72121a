"""PGD-10 images per second: the fast engine against the reference, in one process, on the same
device, model and data.

The attack is the issue's: untargeted L-inf PGD, eps 8/255, alpha 2/255, 10 steps, with the
random start (torchattacks' ``PGD`` default and ``fastpurify.pgd``'s), on chunks of ``batch_size``
images (512 by default) of CIFAR-shaped data (3×32×32, 10 classes) against PreAct-ResNet-18.
The images stay on the device. Each timed step attacks the next chunk (cycling through
``num_images // batch_size`` chunks) with the random start drawn from one seeded generator per
variant. After a warm-up (compilation, graph capture; cuDNN autotuning where named) ``repeats`` blocks of
``iterations`` chunks are timed between device synchronisations; we report the median, min and
max milliseconds per chunk, images per second, and the peak device memory.

Variants (each adds one of the wins of the issue to the one before it):

- ``reference``: :func:`fastpurify.reference.pgd`, eager, the model's weights requiring gradients;
- ``reference-frozen``: the same on a model whose weights do not require gradients;
- ``reference-compile``: the reference on ``torch.compile(model)`` (on CPU only when named);
- ``fast-eager``: :class:`~fastpurify.engines.pgd.PGDAttack` without a CUDA graph: frozen
  weights, one fused launch per step and for the random start, static buffers;
- ``fast-graph`` (CUDA): the same with the 10-step loop of a chunk captured in a CUDA graph;
- ``fast``: the engine as ``fastpurify.pgd`` runs it: the images handed to the model in
  channels_last (on CUDA, and on the CPU for float32 models), and on CUDA the graph and TF32 for
  convolutions and matmuls;
- ``fast-bf16`` (CUDA): ``fast`` under bfloat16 autocast;
- ``fast-native-norms`` (CUDA): ``fast`` with the model's eval BatchNorms left to PyTorch
  (``fused_norms=False``), to measure what the fused eval kernels
  (:mod:`fastpurify.eval_norms`) add.
- ``reference-autotune``, ``fast-autotune`` (CUDA): ``reference`` and ``fast`` with cuDNN
  autotuning, each in a thread of its own (:func:`.common.in_autotune_thread`); fastpurify's
  engines do not turn it on.

The reference variants, ``fast-eager`` and ``fast-graph`` run under PyTorch's TF32 defaults
(recorded in the environment); ``fast`` and ``fast-bf16`` turn TF32 on as the engine does.

Beside the timings: an equivalence check of every fast variant against the reference on the
first chunk from the same seed (max and mean absolute difference, fraction of equal pixels),
and optionally one end-to-end call of ``fastpurify.pgd`` against ``fastpurify.reference.pgd``
on ``end_to_end_images`` images (graph capture and checks included).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable

import torch
import torch.nn as nn

from ..data import make_generator, synthetic_dataset
from ..engines.pgd import PGDAttack
from ..engines.pgd import pgd as fast_pgd
from ..engines.runtime import channels_last_default, resolve_device, tf32_enabled
from ..inference import model_dtype
from ..reference import pgd as reference_pgd
from ..validation import check_positive_int
from .common import (AUTOTUNED_VARIANTS, build_variants, check_interleavable, choose_variants, compile_model,
                     environment, run_variants, skipped_lines, synthetic_subject, table, time_interleaved,
                     time_variant, timed, untuned)

VARIANTS = ("reference", "reference-frozen", "reference-compile", "fast-eager", "fast-graph", "fast", "fast-bf16",
            "fast-native-norms", *AUTOTUNED_VARIANTS)
CUDA_ONLY = ("fast-graph", "fast-bf16", "fast-native-norms", *AUTOTUNED_VARIANTS)
CPU_DEFAULT_SKIP = ("reference-compile",)
PGD_KW = dict(eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, norm="linf")

Attack = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def _reference_attack(model: nn.Module, device: torch.device, *, frozen: bool, compiled: bool,
                      pgd_kw: dict) -> Attack:
    net = copy.deepcopy(model).to(device)
    if frozen:
        net.requires_grad_(False)
    if compiled:
        net = compile_model(net)
    return lambda x, y, g: reference_pgd(net, x, y, generator=g, **pgd_kw)


def _fast_attack(model: nn.Module, device: torch.device, *, graph: bool, channels_last: bool, tf32: bool,
                 precision: str, fused_norms: bool | None, pgd_kw: dict) -> Attack:
    net = copy.deepcopy(model).to(device)
    kw = {k: v for k, v in pgd_kw.items() if k != "random_start"}
    engine = PGDAttack(net, precision=precision, cuda_graph=graph, capture_after=1, channels_last=channels_last,
                       fused_norms=fused_norms, **kw)

    def attack(x, y, g):
        with tf32_enabled(True) if tf32 else contextlib.nullcontext():
            return engine.attack(x, y, random_start=pgd_kw["random_start"], generator=g, batch_size=x.shape[0])
    attack.engine = engine
    return attack


def build_attack(name: str, model: nn.Module, device: torch.device, pgd_kw: dict | None = None) -> Attack:
    """The variant's ``attack(x, y, generator) -> adversarial x`` on a copy of ``model`` on ``device``."""
    pgd_kw = dict(PGD_KW, **(pgd_kw or {}))
    if name.startswith("reference"):
        return _reference_attack(model, device, frozen=name == "reference-frozen",
                                 compiled=name == "reference-compile", pgd_kw=pgd_kw)
    cuda = device.type == "cuda"
    default = name in ("fast", "fast-bf16", "fast-native-norms")
    return _fast_attack(model, device, graph=cuda and (default or name == "fast-graph"),
                        channels_last=default and channels_last_default(device, model_dtype(model)),
                        tf32=cuda and default, precision="bf16" if name == "fast-bf16" else "fp32",
                        fused_norms=False if name == "fast-native-norms" else None, pgd_kw=pgd_kw)


def chunk_step(attack: Attack, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
               seed: int = 0) -> Callable[[], torch.Tensor]:
    """A no-argument step attacking the next of the full chunks of ``batch_size`` images."""
    chunks = itertools.cycle([(images[s:s + batch_size], labels[s:s + batch_size])
                              for s in range(0, images.shape[0] - batch_size + 1, batch_size)])
    generator = make_generator(seed, images.device)

    def step():
        x, y = next(chunks)
        return attack(x, y, generator)
    return step


def profile_variants(names: tuple[str, ...], *, arch: str = "preact_resnet18", batch_size: int = 512,
                     image_size: int = 32, steps: int = 10, device=None, iterations: int = 4) -> dict:
    """Each variant's chunk step under ``torch.profiler`` (:func:`.profile.profile_step`)."""
    from .profile import profile_step

    device = resolve_device(device)
    model, images, labels = synthetic_subject(arch, 2 * batch_size, device, image_size=image_size)
    pgd_kw = dict(PGD_KW, steps=steps)
    return {name: profile_step(chunk_step(build_attack(name, model, device, pgd_kw), images, labels, batch_size),
                               device, iterations=iterations) for name in names}


def agreement(adv: torch.Tensor, ref: torch.Tensor, x0: torch.Tensor, eps: float) -> dict:
    """How close a variant's examples are to the reference's (same images and seed)."""
    diff = (adv.float() - ref.float()).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "equal_fraction": float((diff == 0).float().mean()),
            "within_eps": bool(float((adv - x0).abs().max()) <= eps + 1e-6)}


def _note(name: str, attack: Attack) -> str:
    engine = getattr(attack, "engine", None)
    if engine is None:
        return ""
    parts = [f"{engine.graphs.captured} CUDA graph(s)"] if engine.graphs.enabled else []
    if engine.memory_format == torch.channels_last:
        parts.append("channels_last input")
    if name in ("fast", "fast-bf16", "fast-native-norms") and engine.device.type == "cuda":
        parts.append("TF32")
    if engine.precision == "bf16":
        parts.append("bf16")
    if engine.norms is not None:
        parts.append(f"{len(engine.norms)} fused eval BatchNorm(s)")
    return ", ".join(parts)


def run_pgd_benchmark(*, arch: str = "preact_resnet18", batch_size: int = 512, num_images: int = 2048,
                      image_size: int = 32, channels: int = 3, num_classes: int = 10, device=None,
                      variants: tuple[str, ...] | None = None, warmup: int = 3, iterations: int = 4,
                      repeats: int = 5, steps: int = 10, random_start: bool = True, check: bool = True,
                      end_to_end_images: int = 0, interleave: bool | None = None,
                      progress: Callable[[str], None] | None = print) -> dict:
    """Time the variants and return the result dict (JSON-ready). Defaults: the issue's setting,
    PGD-10 at batch 512 on PreAct-ResNet-18 with CIFAR shapes (synthetic pixels: the speed does
    not depend on them), 4 chunks per block. ``check``: compare each fast variant's examples of
    the first chunk with the reference's. ``end_to_end_images``: also time one whole
    ``fastpurify.pgd`` call and one ``fastpurify.reference.pgd`` call on that many images.
    ``interleave`` (None: off CUDA): time the variants in interleaved blocks (no peak memory)."""
    device = resolve_device(device)
    for name, value in (("batch_size", batch_size), ("num_images", num_images), ("iterations", iterations),
                        ("repeats", repeats), ("steps", steps)):
        check_positive_int(value, name)
    num_images = max(num_images, batch_size)
    variants = choose_variants(variants, VARIANTS, device, cuda_only=CUDA_ONLY, cpu_default_skip=CPU_DEFAULT_SKIP)
    pgd_kw = dict(PGD_KW, steps=steps, random_start=random_start)
    model, images, labels = synthetic_subject(arch, num_images, device, num_classes=num_classes, channels=channels,
                                              image_size=image_size)
    first = images[:batch_size], labels[:batch_size]
    reference_first: list[torch.Tensor] = []
    checks: dict[str, dict] = {}

    def check_against_reference(name, attack):
        if check and name == "reference":
            reference_first.append(attack(*first, make_generator(0, device)))
        elif check and name.startswith("fast"):
            if not reference_first:
                reference_first.append(build_attack("reference", model, device, pgd_kw)(*first,
                                                                                         make_generator(0, device)))
            adv = attack(*first, make_generator(0, device))
            checks[name] = agreement(adv, reference_first[0], first[0], pgd_kw["eps"])

    def measure(name):
        attack = build_attack(untuned(name), model, device, pgd_kw)
        timing = time_variant(name, chunk_step(attack, images, labels, batch_size), device, warmup=warmup,
                              iterations=iterations, repeats=repeats, items=batch_size, unit="images")
        timing.note = _note(name, attack)
        check_against_reference(name, attack)
        return timing

    interleave = device.type != "cuda" if interleave is None else interleave
    if interleave:
        check_interleavable(variants)
        attacks, skipped = build_variants(variants, lambda n: build_attack(n, model, device, pgd_kw), progress=progress)
        for name, attack in attacks.items():
            check_against_reference(name, attack)
        if progress:
            progress(f"  timing {len(attacks)} variants in interleaved blocks ...")
        timings = time_interleaved({n: (chunk_step(a, images, labels, batch_size), _note(n, a))
                                    for n, a in attacks.items()}, device, warmup=warmup, iterations=iterations,
                                   repeats=repeats, items=batch_size, unit="images")
    else:
        timings, skipped = run_variants(variants, measure, device, progress=progress)
    result = {"benchmark": "pgd", "environment": environment(device),
              "settings": dict(arch=arch, batch_size=batch_size, num_images=num_images, image_size=image_size,
                               channels=channels, num_classes=num_classes, warmup=warmup,
                               iterations_per_block=iterations, repeats=repeats, interleaved=interleave, **pgd_kw),
              "variants": [t.as_dict() for t in timings], "skipped": skipped}
    if checks:
        result["equivalence"] = {"against": "reference", "images": batch_size, "seed": 0, "variants": checks}
    if end_to_end_images:
        if progress:
            progress(f"  fastpurify.pgd vs reference.pgd end to end, {end_to_end_images} images ...")
        result["end_to_end"] = end_to_end(model, device, n=end_to_end_images, batch_size=batch_size, pgd_kw=pgd_kw,
                                          num_classes=num_classes, channels=channels, image_size=image_size)
    return result


def end_to_end(model: nn.Module, device: torch.device, *, n: int, batch_size: int, pgd_kw: dict, num_classes: int,
               channels: int, image_size: int) -> dict:
    """One ``fastpurify.pgd`` call against one reference call (chunks of ``batch_size``) on ``n``
    device-resident images, seed 0 for both; the seconds, images per second and the agreement."""
    images, labels = synthetic_dataset(n=n, num_classes=num_classes, channels=channels, size=image_size, seed=1)
    images, labels = images.to(device), labels.to(device)
    net = copy.deepcopy(model).to(device)
    ref, ref_s = timed(lambda: reference_pgd(net, images, labels, seed=0, batch_size=batch_size, **pgd_kw), device)
    fast, fast_s = timed(lambda: fast_pgd(net, images, labels, seed=0, batch_size=batch_size, **pgd_kw), device)
    return {"images": n, "batch_size": batch_size, "reference_seconds": round(ref_s, 4),
            "fast_seconds": round(fast_s, 4), "reference_images_per_second": round(n / ref_s, 2),
            "fast_images_per_second": round(n / fast_s, 2), "speedup": round(ref_s / fast_s, 3),
            "agreement": agreement(fast, ref, images, pgd_kw["eps"])}


def format_table(result: dict) -> str:
    """A text table of the variants (ms per chunk, images/s, ratios, memory) and the checks."""
    env, s = result["environment"], result["settings"]
    lines = [f"PGD-{s['steps']} (eps {s['eps'] * 255:.0f}/255, alpha {s['alpha'] * 255:.0f}/255, random start "
             f"{s['random_start']}) on {s['arch']}, chunks of {s['batch_size']} images of {s['image_size']}px; "
             f"{env['device']} (torch {env['torch']}, triton {env['triton']}); median of {s['repeats']} blocks of "
             f"{s['iterations_per_block']} chunks",
             *table(result["variants"], rate_key="images_per_second", time_header="ms/chunk", rate_header="img/s"),
             *skipped_lines(result)]
    for name, c in result.get("equivalence", {}).get("variants", {}).items():
        lines.append(f"{name} vs reference: max |diff| {c['max_abs_diff']:.3g}, {c['equal_fraction']:.2%} of pixels "
                     f"equal, within eps {c['within_eps']}")
    if "end_to_end" in result:
        e = result["end_to_end"]
        lines.append(f"end to end on {e['images']} images: fastpurify.pgd {e['fast_seconds']:.2f} s "
                     f"({e['fast_images_per_second']:.0f} img/s), reference {e['reference_seconds']:.2f} s "
                     f"({e['reference_images_per_second']:.0f} img/s): {e['speedup']:.2f}x")
    return "\n".join(lines)
