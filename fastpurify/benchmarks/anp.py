"""ANP iterations per second: the fast engine against the reference, in one process, on the
same device, model and data.

Every variant runs whole ANP iterations (batch draw and augmentation included) from the same
seeded sampler. Each is warmed up (compilation, graph capture; cuDNN autotuning where named), then timed in
``repeats`` blocks of ``iterations`` iterations with a device synchronisation around each block;
we report the median, min and max time per iteration over the blocks and the peak device memory.

Variants (each isolates one of DESIGN.md §4's wins):

- ``reference``: the official script's semantics, eager (weights get gradients, two separate
  forward passes in the mask step, per-layer updates);
- ``reference-frozen``: the reference on a model whose weights do not require gradients (win 1);
- ``reference-compile``: the reference with its model under ``torch.compile``;
- ``fast-separate``: fastpurify with the clean and perturbed passes run separately, no CUDA graph
  (frozen weights, fused BatchNorm, flat-arena updates: wins 1 and 4; the device's default
  layout, channels_last for a float32 model);
- ``fast-eager``: fastpurify with the two-group batch, no CUDA graph (adds win 3);
- ``fast``: fastpurify as it runs by default (on CUDA adds the graph and TF32: win 5; on the CPU
  it runs the passes separately, as ``fast-separate``: the two-group batch does not pay there);
- ``fast-nchw`` (by default on the CPU only): ``fast`` with ``channels_last=False``, on the CPU
  the reference's arithmetic bit for bit (the CPU default before 2026-11-27);
- ``fast-bf16``: ``fast`` under bfloat16 autocast;
- ``fast-unfused`` (by default on CUDA only): ``fast`` without the ReLUs (and the residual adds
  before them) folded into the BatchNorms before them (``fused_relu=False``;
  :mod:`fastpurify.fusion`, on by default on CUDA): what the folding adds;
- ``fast-seeds4``: ``fast`` as a batched seed ensemble of 4 members (``fastpurify.anp(seeds=4,
  batched=True)``, the default on CUDA): one iteration advances 4 independent mask sets, so its
  time over ``fast``'s is what the batched ensemble costs (4.0: no better than the 4 runs one
  after another, the default off CUDA).
- ``reference-autotune``, ``fast-autotune`` (CUDA): ``reference`` and ``fast`` with cuDNN
  autotuning (``torch.backends.cudnn.benchmark``), each in a thread of its own so that its
  convolutions are autotuned whatever the default variants cached
  (:func:`.common.in_autotune_thread`); fastpurify's engines do not turn it on. Their
  ``ratio_vs_autotuned_reference`` compares the two sides both autotuned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from ..data import DeviceBatchSampler, make_generator
from ..ensemble import draws
from ..engines.anp import ANPEngine
from ..engines.anp import anp as fast_anp
from ..engines.runtime import check_micro_batch, resolve_device, tf32_enabled, use_channels_last
from ..neurons import DEFAULT_KINDS, check_kinds
from ..pruning import select_neurons
from ..reference.anp import ANPState
from ..validation import InputError, check_positive_int
from .common import (AUTOTUNED_VARIANTS, build_variants, check_interleavable, choose_variants, compile_model,
                     environment, run_variants, skipped_lines, synthetic_subject, table, time_interleaved,
                     time_variant, untuned)

VARIANTS = ("reference", "reference-frozen", "reference-compile", "fast-separate", "fast-eager", "fast",
            "fast-nchw", "fast-bf16", "fast-unfused", "fast-seeds4", *AUTOTUNED_VARIANTS)
CUDA_ONLY = AUTOTUNED_VARIANTS
ENSEMBLE_MEMBERS = 4
ANP_KW = dict(eps=0.4, steps=1, alpha=0.2, lr=0.2, momentum=0.9, clamp_noise=True)


def _reference_step(model, images, labels, batch_size, device, *, frozen=False, compiled=False,
                    mask_layers=DEFAULT_KINDS) -> Callable:
    model = copy.deepcopy(model).to(device)
    if frozen:
        model.requires_grad_(False)
    state = ANPState(model, mask_layers=mask_layers, **ANP_KW)
    if compiled:
        state.model = compile_model(state.model)
    sampler = DeviceBatchSampler(images, labels, batch_size, seed=0, device=device)
    noise = make_generator(1, device)
    return lambda: state.iteration(*sampler.sample(), noise)


def _fast_step(model, images, labels, batch_size, device, *, grouped=None, graph=True, precision="fp32",
               large: dict | None = None, members: int = 1, channels_last: bool | None = None,
               fuse_relu: bool | None = None) -> Callable:
    channels_last = use_channels_last(channels_last, device, images)  # as fastpurify.anp
    fuse_relu = device.type == "cuda" if fuse_relu is None else fuse_relu  # as fastpurify.anp
    engine = ANPEngine(model, (members * batch_size, *images.shape[1:]), device=device, grouped=grouped,
                       channels_last=channels_last, precision=precision, members=members, fuse_relu=fuse_relu,
                       **(large or {}), **ANP_KW)
    sampler, noise = draws(images, labels, batch_size, 0, members, device=device)
    graphed = engine.capture() if graph and device.type == "cuda" else None

    def step():
        engine.iterate(sampler, noise, graphed)
    step.graphed = graphed is not None
    step.channels_last = channels_last
    step.fused_relus, step.fused_residuals = engine.fused_relus, engine.fused_residuals
    return step


def _build(name, model, images, labels, batch_size, device, large: dict | None = None) -> Callable:
    """The variant's step; ``large``: mask_layers (every variant), micro_batch and checkpoint (fast)."""
    if name.startswith("reference"):
        return _reference_step(model, images, labels, batch_size, device, frozen=name == "reference-frozen",
                               compiled=name == "reference-compile",
                               mask_layers=(large or {}).get("mask_layers", DEFAULT_KINDS))
    grouped = {"fast-separate": False, "fast-eager": True}.get(name)  # None: the engine's default for the device
    members = ENSEMBLE_MEMBERS if name == "fast-seeds4" else 1
    if members > 1 and large and (large.get("micro_batch") or large.get("checkpoint")):
        raise InputError("fast-seeds4 (a seed ensemble) does not combine with micro_batch or checkpoint")
    return _fast_step(model, images, labels, batch_size, device, grouped=grouped,
                      graph=name in ("fast", "fast-bf16", "fast-seeds4", "fast-unfused"),
                      precision="bf16" if name == "fast-bf16" else "fp32", large=large, members=members,
                      channels_last=False if name == "fast-nchw" else None,
                      fuse_relu=False if name == "fast-unfused" else None)


def profile_variants(names: tuple[str, ...], *, arch: str = "cifar_resnet18", batch_size: int = 128,
                     num_images: int = 500, image_size: int = 32, device=None, iterations: int = 10) -> dict:
    """Each variant's step under ``torch.profiler`` (:func:`.profile.profile_step`): its wall time
    against its kernels' device time, by kind, and the top kernels."""
    from .profile import profile_step

    device = resolve_device(device)
    model, images, labels = synthetic_subject(arch, num_images, device, image_size=image_size)
    out = {}
    with tf32_enabled(device.type == "cuda"):
        for name in names:
            step = _build(name, model, images, labels, batch_size, device)
            out[name] = profile_step(step, device, iterations=iterations)
            del step
    return out


def pruned_set_change(model, images, labels, *, batch_size, device, iterations) -> dict:
    """Neurons at threshold 0.2 that bf16 autocast changes against fp32 after the same run."""
    kw = dict(batch_size=batch_size, iterations=iterations, device=device, progress=False, seed=0)
    runs = {p: fast_anp(model, (images, labels), precision=p, **kw) for p in ("fp32", "bf16")}
    chosen = {p: select_neurons(r.masks, threshold=0.2) for p, r in runs.items()}
    changed = sum(int((chosen["fp32"][k] ^ chosen["bf16"][k]).sum()) for k in chosen["fp32"])
    gap = max(float((runs["fp32"].masks[k] - runs["bf16"].masks[k]).abs().max()) for k in runs["fp32"].masks)
    return {"iterations": iterations, "threshold": 0.2, "num_neurons": runs["fp32"].num_neurons,
            "pruned_fp32": sum(int(v.sum()) for v in chosen["fp32"].values()),
            "pruned_bf16": sum(int(v.sum()) for v in chosen["bf16"].values()), "changed": changed,
            "max_mask_gap": round(gap, 6)}


def run_anp_benchmark(*, arch: str = "cifar_resnet18", batch_size: int = 128, num_images: int = 500,
                      image_size: int = 32, channels: int = 3, num_classes: int = 10, device=None,
                      variants: tuple[str, ...] | None = None, warmup: int = 3, iterations: int = 10,
                      repeats: int = 5, end_to_end_iterations: int = 0, precision_check_iterations: int = 0,
                      mask_layers=DEFAULT_KINDS, micro_batch: int | None = None, checkpoint: bool = False,
                      interleave: bool | None = None, progress: Callable[[str], None] | None = print) -> dict:
    """Time the variants and return the result dict (JSON-ready). Defaults: the issue's setting,
    CIFAR ResNet-18 at batch 128 on 500 images (synthetic pixels: the speed does not depend on
    them). ``end_to_end_iterations``: also time one whole ``fastpurify.anp`` call of that many
    iterations. ``precision_check_iterations``: also count the pruned neurons bf16 changes.
    Large models: ``mask_layers`` (every variant), ``micro_batch`` and ``checkpoint`` (the fast
    variants; e.g. ``arch="torchvision:vit_b_16", image_size=224``); each variant's peak device
    memory is recorded on CUDA. ``interleave`` (None: off CUDA) builds every variant first and
    times them in interleaved blocks (:func:`time_interleaved`; no peak memory then), the fair
    comparison on a machine whose speed drifts."""
    device = resolve_device(device)
    for name, value in (("batch_size", batch_size), ("num_images", num_images), ("iterations", iterations),
                        ("repeats", repeats)):
        check_positive_int(value, name)
    defaults = variants is None
    variants = choose_variants(variants, VARIANTS, device, cuda_only=CUDA_ONLY,
                               cpu_default_skip=("reference-compile", "fast-bf16", "fast-unfused"))
    if defaults and device.type == "cuda":  # NCHW on CUDA only when named
        variants = tuple(v for v in variants if v != "fast-nchw")
    if defaults and (micro_batch or checkpoint):  # the ensemble does not micro-batch: left out of a large run
        variants = tuple(v for v in variants if v != "fast-seeds4")
    mask_layers = check_kinds(mask_layers)
    large = dict(mask_layers=mask_layers, micro_batch=check_micro_batch(micro_batch, batch_size),
                 checkpoint=checkpoint)
    model, images, labels = synthetic_subject(arch, num_images, device, num_classes=num_classes, channels=channels,
                                              image_size=image_size)

    def note(step):
        parts = ["CUDA graph"] if getattr(step, "graphed", False) else []
        if device.type == "cpu" and hasattr(step, "channels_last"):
            parts.append("channels_last" if step.channels_last else "NCHW")
        if getattr(step, "fused_relus", 0):
            parts.append(f"{step.fused_relus} ReLUs folded ({step.fused_residuals} with their residual add)")
        return ", ".join(parts)

    def measure(name):
        step = _build(untuned(name), model, images, labels, batch_size, device, large)
        return time_variant(name, step, device, warmup=warmup, iterations=iterations, repeats=repeats,
                            note=note(step))

    interleave = device.type != "cuda" if interleave is None else interleave
    with tf32_enabled(device.type == "cuda"):
        if interleave:
            check_interleavable(variants)
            steps, skipped = build_variants(variants, lambda n: _build(n, model, images, labels, batch_size, device,
                                                                       large), progress=progress)
            if progress:
                progress(f"  timing {len(steps)} variants in interleaved blocks ...")
            timings = time_interleaved({n: (s, note(s)) for n, s in steps.items()}, device, warmup=warmup,
                                       iterations=iterations, repeats=repeats)
        else:
            timings, skipped = run_variants(variants, measure, device, progress=progress)
    result = {"benchmark": "anp", "environment": environment(device),
              "settings": dict(arch=arch, batch_size=batch_size, num_images=num_images, image_size=image_size,
                               channels=channels, num_classes=num_classes, warmup=warmup,
                               mask_layers=list(mask_layers), micro_batch=micro_batch, checkpoint=checkpoint,
                               iterations_per_block=iterations, repeats=repeats, interleaved=interleave,
                               tf32=device.type == "cuda", **ANP_KW),
              "variants": [t.as_dict() for t in timings], "skipped": skipped}
    if end_to_end_iterations:
        if progress:
            progress(f"  fastpurify.anp end to end, {end_to_end_iterations} iterations ...")
        run = fast_anp(model, (images, labels), iterations=end_to_end_iterations, batch_size=batch_size,
                       device=device, progress=False, **large)
        result["end_to_end"] = {"iterations": end_to_end_iterations, "seconds": round(run.seconds, 3),
                                "engine": run.engine}
    if precision_check_iterations:
        if progress:
            progress(f"  bf16 vs fp32 pruned set, {precision_check_iterations} iterations each ...")
        result["bf16_pruned_set"] = pruned_set_change(model, images, labels, batch_size=batch_size, device=device,
                                                      iterations=precision_check_iterations)
    return result


def format_table(result: dict) -> str:
    """A text table of the variants: medians, spread, ratios, memory."""
    env, s = result["environment"], result["settings"]
    lines = [f"ANP on {s['arch']}, batch {s['batch_size']}, {s['num_images']} images of {s['image_size']}px; "
             f"{env['device']} (torch {env['torch']}, triton {env['triton']}); median of {s['repeats']} blocks of "
             f"{s['iterations_per_block']} iterations",
             *table(result["variants"], rate_key="iterations_per_second"), *skipped_lines(result)]
    if "end_to_end" in result:
        e = result["end_to_end"]
        lines.append(f"fastpurify.anp end to end: {e['iterations']} iterations in {e['seconds']:.2f} s")
    if "bf16_pruned_set" in result:
        b = result["bf16_pruned_set"]
        lines.append(f"bf16 vs fp32 after {b['iterations']} iterations: {b['changed']} of {b['num_neurons']} neurons "
                     f"change side of threshold 0.2 ({b['pruned_fp32']} vs {b['pruned_bf16']} pruned)")
    return "\n".join(lines)
