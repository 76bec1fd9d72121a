"""The fast ANP engine: ``fastpurify.anp(model, clean_data)``.

The same algorithm, keywords, defaults and random draws as :func:`fastpurify.reference.anp`
(the official ``optimize_mask_cifar.py``), computed with less work (DESIGN.md §4):

1. the model's weights are frozen: backward passes compute input and mask/noise gradients only;
2. the clean data lives on the device and is augmented there in batches (``DeviceBatchSampler``);
3. the mask step's clean and perturbed forward passes run as one two-group batch through the
   fused BatchNorm (``groups=2``: each half normalised with its own statistics, so it is exactly
   the two passes of the reference);
4. masks, noises and the momentum buffer of the whole network sit in one flat arena
   (:class:`fastpurify.arena.NeuronArena`): one launch per update per iteration;
5. image batches in channels_last by default on CUDA and, for float32 / bfloat16 models, on the
   CPU (1.5x faster for a CNN there; see ``channels_last`` in :func:`anp`);
6. on CUDA the iteration (after the random draws) is captured in a CUDA graph and replayed;
   TF32 by default; bfloat16 autocast on request.

Non-finite loss: the mask update of that iteration and all later ones is skipped on the device
(no synchronisation per iteration); at the next check the run stops with :class:`ANPDiverged`,
which names the iteration and carries the masks of the last finite one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from .. import functional as FP
from ..anp_eps import AUTO as AUTO_EPS
from ..anp_eps import auto_eps
from ..arena import NeuronArena
from ..data import DeviceBatchSampler, as_tensors
from ..ensemble import AGGREGATES, EnsembleArena, MemberSamplers, aggregate_masks, draws
from ..fusion import fuse_batch_norm_relu
from ..inference import anp_mode, model_dtype
from ..layers import convert, layer_paths
from ..masks import ANPResult
from ..neurons import DEFAULT_KINDS, check_kinds
from ..validation import InputError, check_anp_settings, check_positive_int
from .checkpointing import checkpoint_blocks
from .runtime import (GraphedStep, check_micro_batch, check_precision, logits_in, micro_batch_from_memory,
                      peak_memory, reset_peak_memory, resolve_device, tf32_enabled, to_memory_format,
                      use_channels_last)


class ANPDiverged(RuntimeError):
    """The ANP loss became NaN or infinite. ``iteration`` is the first bad one (1-based);
    ``result`` holds the masks after the last finite iteration."""

    def __init__(self, iteration: int, result: ANPResult):
        self.iteration, self.result = iteration, result
        done = iteration - 1
        super().__init__(f"the ANP loss became non-finite at iteration {iteration} (NaN or Inf; try a smaller lr or "
                         f"eps, or check the model and data); the masks after the last finite iteration ({done}) are "
                         f"kept in this error's .result")


class ANPEngine:
    """A converted, frozen copy of a model on ``device`` with its arena, and one ANP iteration.

    The iteration reads the static ``images``/``labels`` buffers (filled by the sampler's
    ``sample_into`` with this process's share of the batch: one fused launch after its draws)
    and the noise drawn into the arena, so it can be captured in a CUDA graph as it is.
    ``micro_batch`` splits that share into equal micro-batches: each gradient is accumulated over
    them (each micro-batch's loss weighted by its share of the whole batch), and under a process
    group summed over the ranks with one all-reduce per update, so every rank applies the same
    update.
    """

    def __init__(self, model: nn.Module, images_shape: tuple[int, ...], *, device: torch.device, eps: float,
                 steps: int, alpha: float, lr: float, momentum: float, clamp_noise: bool, grouped: bool | None = None,
                 channels_last: bool = False, precision: str = "fp32", mask_layers=DEFAULT_KINDS,
                 micro_batch: int | None = None, global_batch: int | None = None, checkpoint: bool = False,
                 members: int = 1, fuse_relu: bool = False):
        net = convert(model, mask_layers).to(device)  # a copy; the caller's model is untouched
        for p in net.parameters():
            p.requires_grad_(False)  # 1. frozen weights
        for layer in net.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.track_running_stats = False  # batch statistics; no running-stat writes
        anp_mode(net)  # BatchNorm on batch statistics, as the official script; no dropout
        self.fused_relus = 0  # ReLUs folded into the BatchNorm before them (fastpurify.fusion; not with checkpoint,
        if fuse_relu and not checkpoint:  # which wraps the model's own blocks); checked on a random batch
            net, self.fused_relus = fuse_batch_norm_relu(net, _fusion_sample(net, images_shape, device))
        self.fused_residuals = sum(bool(getattr(m, "fused_residual", False)) for m in net.modules())  # and their adds
        self.checkpointed = checkpoint_blocks(net) if checkpoint else []
        self.model = to_memory_format(net, channels_last)
        self.members = members  # a seed ensemble: ``images`` holds the members' batches one after another
        self.arena = NeuronArena(self.model) if members == 1 else EnsembleArena(self.model, members)
        self.device, self.precision, self.grouped = device, precision, use_grouped(grouped, device)
        self.eps, self.steps, self.alpha, self.lr, self.momentum = eps, steps, alpha, lr, momentum
        self.clamp_noise = clamp_noise
        dtype = self.arena.mask.dtype
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.images = torch.zeros(images_shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
        self.labels = torch.zeros(images_shape[0], dtype=torch.long, device=device)
        self.loss = torch.zeros(() if members == 1 else (members,), dtype=dtype, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self._previous_mask = torch.empty_like(self.arena.mask)
        self.global_batch = global_batch or images_shape[0]
        self.set_micro_batch(micro_batch or images_shape[0])
        self._checked = False  # set by the first iteration, which runs the layers' argument checks

    def set_micro_batch(self, micro_batch: int) -> None:
        """Split this process's batch into micro-batches of ``micro_batch`` samples (a divisor)."""
        local = self.images.shape[0]
        self.micro_batch = micro_batch
        self.chunks = [slice(s, s + micro_batch) for s in range(0, local, micro_batch)]
        self.share = micro_batch / self.global_batch  # each micro-batch's weight in the batch's mean loss

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        """The model's logits (under autocast for bf16; the loss is always taken in float32+)."""
        return logits_in(self.model, images, self.device, self.precision)

    def _cross_entropy(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy; for an ensemble each member's, as a (K,) vector."""
        return _member_cross_entropy(self._logits(images), labels, self.members)

    def _mask_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """alpha * CE(clean) + (1 - alpha) * CE(perturbed) on one micro-batch."""
        arena = self.arena
        if self.grouped:  # 3. clean and perturbed passes as one two-group batch
            arena.set_mode("grouped")
            clean, perturbed = self._logits(torch.cat([x, x])).chunk(2)
            k = self.members
            return (self.alpha * _member_cross_entropy(clean, y, k)
                    + (1 - self.alpha) * _member_cross_entropy(perturbed, y, k))
        arena.set_mode("perturbed")
        loss_rob = self._cross_entropy(x, y)
        arena.set_mode("clean")
        return self.alpha * self._cross_entropy(x, y) + (1 - self.alpha) * loss_rob

    def _separate_mask_grads(self, x: torch.Tensor, y: torch.Tensor, accumulate: bool) -> torch.Tensor:
        """The mask gradient of :meth:`_mask_loss` with separate passes under activation
        checkpointing: each pass's gradient is taken while the arena is still in that pass's mode
        (a checkpointed block recomputes its forward in the backward, with the arena's mode of
        that moment). Returns the (weighted) loss."""
        arena = self.arena
        arena.set_mode("perturbed")
        rob = self._weighted((1 - self.alpha) * self._cross_entropy(x, y))
        arena.gather_mask_grad(rob.sum(), accumulate=accumulate)
        arena.set_mode("clean")
        nat = self._weighted(self.alpha * self._cross_entropy(x, y))
        arena.gather_mask_grad(nat.sum(), accumulate=True)
        return nat.detach() + rob.detach()

    def _weighted(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.share == 1.0 else loss * self.share

    def step(self) -> None:
        """One ANP iteration after the noise draw: ``steps`` noise sign steps, the mask step,
        the gated mask update. Writes ``loss`` and ``finite``; no host synchronisation."""
        arena, x, y = self.arena, self.images, self.labels
        for _ in range(self.steps):
            arena.set_mode("perturbed")
            for i, part in enumerate(self.chunks):  # ascend CE
                arena.gather_noise_grad(self._weighted(self._cross_entropy(x[part], y[part])).sum(),
                                        accumulate=i > 0)
            grad = D.all_reduce_sum_(arena.noise_grad)
            FP.noise_sign_step_(arena.perturbation, grad.view(-1), self.eps / self.steps, self.eps,
                                self.clamp_noise)
        total = None
        for i, part in enumerate(self.chunks):
            if self.checkpointed and not self.grouped:
                loss = self._separate_mask_grads(x[part], y[part], accumulate=i > 0)
            else:
                loss = self._weighted(self._mask_loss(x[part], y[part]))
                arena.gather_mask_grad(loss.sum(), accumulate=i > 0)
            total = loss.detach() if total is None else total + loss.detach()
        grad = arena.mask_grad
        if D.world_size() > 1:  # one collective: the mask gradient and the loss together
            both = D.all_reduce_sum_(torch.cat([grad, total.reshape(1).to(grad.dtype)]))
            grad.copy_(both[:-1])
            total = both[-1]
        with torch.no_grad():
            self.loss.copy_(total)
            self.finite.logical_and_(torch.isfinite(self.loss).all())
            self._previous_mask.copy_(arena.mask)
            FP.mask_sgd_step_(arena.mask, grad, arena.momentum, self.lr, self.momentum)
            torch.where(self.finite, arena.mask, self._previous_mask, out=arena.mask)  # skip once non-finite

    def iterate(self, sampler: DeviceBatchSampler | MemberSamplers,
                noise_generator: torch.Generator | list[torch.Generator],
                run: Callable[[], None] | None = None, shard: slice = slice(None)) -> None:
        """One whole iteration: draw the batch (and keep this process's ``shard`` of it), draw
        the noise, run the step (``run``: the captured graph, default the eager :meth:`step`). An
        ensemble takes :class:`MemberSamplers` and one noise generator per member. The first
        iteration checks the arguments of every perturbed layer's call; later ones, the same calls
        on the same buffers, skip those checks (``functional.argument_checks``)."""
        sampler.sample_into(self.images, self.labels, shard)  # one fused launch after the draws, into the buffers
        self.arena.draw_noise(self.eps, noise_generator)
        with FP.argument_checks(not self._checked):
            (run or self.step)()
        self._checked = True

    def _state(self) -> list[torch.Tensor]:
        arena = self.arena
        return [arena.mask, arena.momentum, arena.noise, self.finite]

    def capture(self) -> GraphedStep | None:
        """The step captured in a CUDA graph (self-checked against an eager step), or None."""
        return GraphedStep.try_capture(self.step, state=self._state(), check=[self.arena.mask, self.arena.noise])

    def measure_micro_batch(self, probe: int) -> float:
        """Bytes of CUDA memory one sample of a micro-batch costs, from one step on the first
        ``probe`` samples of the batch buffers (their values do not matter); the step leaves no
        trace (its state is restored)."""
        saved = [t.detach().clone() for t in self._state()]
        keep = self.micro_batch
        self.set_micro_batch(probe)
        self.chunks = self.chunks[:1]
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        torch.cuda.synchronize(self.device)
        per_sample = (torch.cuda.max_memory_allocated(self.device) - base) / probe
        with torch.no_grad():
            for t, s in zip(self._state(), saved):
                t.copy_(s)
        self.set_micro_batch(keep)
        return per_sample


def _member_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, members: int) -> torch.Tensor:
    """The mean cross-entropy of one run, or with ``members`` > 1 each member's mean over its own
    equal share of the batch (a (K,) vector)."""
    if members == 1:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="none").view(members, -1).mean(1)


def use_grouped(grouped: bool | None, device: torch.device) -> bool:
    """The two-group batch where it pays: by default on CUDA only. Measured with ``fastpurify bench
    anp`` on a 2-core CPU (interleaved blocks): separate passes 1.24x the reference (small CNN, 24 px,
    batch 128) and 1.42x (CIFAR ResNet-18), the two-group batch 0.98x and 1.25x (bench/results/)."""
    return device.type == "cuda" if grouped is None else bool(grouped)


def _fusion_sample(net: nn.Module, images_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A few seeded random inputs of the engine's images to check the folded network on (BatchNorm
    takes batch statistics here: more than one sample)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn((min(4, max(2, images_shape[0])), *images_shape[1:]), generator=g,
                       dtype=model_dtype(net)).to(device)


def _check_options(device: torch.device, cuda_graph: bool | None, check_every: int, precision: str) -> bool:
    check_precision(precision)
    check_positive_int(check_every, "check_every")
    if cuda_graph and device.type != "cuda":
        raise InputError(f"cuda_graph=True needs a CUDA device; the engine runs on {device}")
    if cuda_graph and D.world_size() > 1:
        raise InputError("cuda_graph=True is not supported under a process group (the step holds collectives); "
                         "leave cuda_graph=None")
    return device.type == "cuda" and D.world_size() == 1 if cuda_graph is None else bool(cuda_graph)


def _rank_batch(batch_size: int) -> slice:
    """This process's share of every batch (the whole batch without a process group)."""
    world = D.world_size()
    if world > batch_size:
        raise InputError(f"the world size {world} is larger than the batch of {batch_size} images: every rank needs "
                         "at least one image of each batch; use fewer processes or a larger batch_size")
    return D.batch_shard(batch_size)


def _choose_micro_batch(engine: ANPEngine, auto: bool, fixed: int | None, local: int) -> int:
    """The micro-batch: the checked ``fixed`` one, the whole batch, or with ``auto`` on CUDA the
    largest divisor of the batch that fits in free memory."""
    if not auto or engine.device.type != "cuda":
        return fixed or local  # on the CPU, "auto" is the whole batch
    probe = min(local, 8)
    per_sample = engine.measure_micro_batch(probe)
    free, _ = torch.cuda.mem_get_info(engine.device)
    return micro_batch_from_memory(local, per_sample, free + torch.cuda.memory_reserved(engine.device)
                                   - torch.cuda.memory_allocated(engine.device))


def anp(model: nn.Module, clean_data: Any, *, eps: float | str = 0.4, steps: int = 1, alpha: float = 0.2,
        lr: float = 0.2, momentum: float = 0.9, iterations: int = 2000, batch_size: int = 128, clamp_noise: bool = True,
        augment: bool = True, padding: int = 4, flip: bool = True, seed: int = 0,
        device: torch.device | str | None = None, progress: bool = True, grouped: bool | None = None,
        cuda_graph: bool | None = None, channels_last: bool | None = None, tf32: bool = True,
        precision: str = "fp32", check_every: int = 50, mask_layers: Iterable[str] | str = DEFAULT_KINDS,
        micro_batch: int | str | None = None, checkpoint: bool = False, seeds: int = 1,
        aggregate: str = "mean", batched: bool | None = None, fused_relu: bool | None = None) -> ANPResult:
    """Learn ANP masks for ``model`` on the defender's clean data; ``model`` is never modified.

    ``clean_data``: ``(images, labels)`` tensors or arrays, a Dataset or a DataLoader (anything
    :func:`fastpurify.data.as_tensors` reads). The keywords up to ``seed`` mean what they mean
    in :func:`fastpurify.reference.anp`, with the same defaults and, for one seed, the same
    batches, augmentations and noise; ``eps="auto"`` reads the bound from the model before any mask
    is learned (:mod:`fastpurify.anp_eps`: the smallest eps up to the paper's 0.4 at which one sign
    step of every neuron halves the clean accuracy on these images; ``settings["eps_auto"]`` says
    what was measured). ``mask_layers``: the layers whose neurons are masked
    (:mod:`fastpurify.neurons`: "batchnorm", "layernorm", "groupnorm" by default; "conv_linear" for the
    paper's Eq. 3 on networks without normalisation). Speed options: ``device`` (default: CUDA
    if available), ``grouped`` (clean and perturbed passes as one two-group batch; None: on CUDA,
    where one large batch fills the GPU better — on the CPU the two passes run separately, which
    is faster there: the same work without the batch copies),
    ``cuda_graph`` (None: on CUDA), ``channels_last`` (None: on CUDA, and on the CPU for float32
    and bfloat16 models, where a CNN's iteration runs ~1.5x faster; it sums in another order than
    the reference, and over a long run ANP's masks follow a rounding difference the way they
    follow another seed, so the outcome differs seed by seed but not on average: over 30 seeds of
    the end-to-end digits subject channels_last did as well as NCHW with its weights nudged by
    one ulp (bench/NOTES.md, 2026-11-27). ``channels_last=False`` on the CPU: the reference's
    arithmetic bit for bit), ``tf32`` (CUDA
    convolutions and matmuls), ``precision`` ("fp32" or "bf16" autocast), ``check_every``
    (iterations between host checks of the loss), ``fused_relu`` (a ReLU that is all a BatchNorm's
    output feeds, or all a residual add of it feeds, folded into the BatchNorm's kernels with that
    add: :mod:`fastpurify.fusion`; None: on CUDA; the same function, the ReLU's and the add's
    passes saved). Prune afterwards with :func:`fastpurify.prune`.

    Memory: ``micro_batch`` (a divisor of the batch, "auto": the largest that fits in free CUDA
    memory, None: the whole batch) processes each batch in micro-batches with accumulated
    gradients; ``checkpoint`` recomputes each block's activations in the backward. LayerNorm and
    Conv/Linear neurons get exactly the whole-batch gradients; BatchNorm normalises each
    micro-batch with its own statistics (a declared approximation: docs/large-models.md).

    Seed ensemble: ``seeds=K`` (K > 1) trains K independent mask sets, member k exactly the
    single run with seed ``seed + k`` (its own batches, augmentations and noise). ``batched``
    (None: on CUDA) runs them at once, as K batch groups of one batch through the network
    (:mod:`fastpurify.ensemble`; not combined with ``micro_batch``, ``checkpoint`` or a process
    group); otherwise one after another, which is faster on the CPU (measured: the 4x batch is
    memory-bound there). ``result.members`` holds every member's masks, ``result.member_loss``
    their losses; ``result.masks`` (what pruning uses) is their ``aggregate``: "mean" (the mean
    mask, default: the paper's threshold keeps its meaning; measured in docs/anp-selection.md) or
    "rank" (the mean normalised rank). ``result.loss`` is the members' mean loss.

    Under an initialised ``torch.distributed`` process group (e.g. ``torchrun``), the run is
    data-parallel: every rank draws the same batch, keeps its own equal share, and the mask and
    noise gradients are summed over the ranks (one all-reduce per update): the masks equal one
    process's with ``micro_batch = batch_size / world_size``.
    """
    check_anp_settings(eps=eps, steps=steps, alpha=alpha, lr=lr, momentum=momentum, iterations=iterations,
                       batch_size=batch_size, auto_eps=True)
    mask_layers = check_kinds(mask_layers)
    check_positive_int(seeds, "seeds")
    if aggregate not in AGGREGATES:
        raise InputError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    device = D.local_device(device) if D.world_size() > 1 else resolve_device(device)
    eps_auto = None
    if eps == AUTO_EPS:  # read from the model once, before any mask is learned (every member uses it)
        clean_data = as_tensors(clean_data, dtype=model_dtype(model))  # read once: the masks learn on these
        eps_auto = auto_eps(model, *clean_data, mask_layers=mask_layers, batch_size=batch_size, device=device,
                            seed=seed)
        eps = eps_auto["value"]
    if seeds > 1 and not use_batched(batched, device):
        kw = dict(eps=eps, steps=steps, alpha=alpha, lr=lr, momentum=momentum, iterations=iterations,
                  batch_size=batch_size, clamp_noise=clamp_noise, augment=augment, padding=padding, flip=flip,
                  device=device, progress=progress, grouped=grouped, cuda_graph=cuda_graph,
                  channels_last=channels_last, tf32=tf32, precision=precision, check_every=check_every,
                  mask_layers=mask_layers, micro_batch=micro_batch, checkpoint=checkpoint, fused_relu=fused_relu)
        return _with_eps_record(_one_after_another(model, clean_data, seed, seeds, aggregate, kw), eps_auto)
    _check_batched(seeds, micro_batch, checkpoint)
    shard = _rank_batch(batch_size)
    local = shard.stop - shard.start
    fixed = check_micro_batch(micro_batch, local, "batch per process" if D.world_size() > 1 else "batch")
    use_graph = _check_options(device, cuda_graph, check_every, precision)
    dtype = model_dtype(model)
    images, labels = as_tensors(clean_data, dtype=dtype)
    n = int(images.shape[0])
    if n < batch_size and D.is_main():
        warnings.warn(f"the clean data holds {n} images, fewer than one batch of {batch_size}: every batch is drawn "
                      "with replacement (as always in ANP), so images repeat within a batch", UserWarning,
                      stacklevel=2)
    settings = dict(eps=eps, steps=steps, alpha=alpha, lr=lr, momentum=momentum, iterations=iterations,
                    batch_size=batch_size, clamp_noise=clamp_noise, augment=augment, padding=padding, flip=flip,
                    seed=seed, num_images=n, mask_layers=list(mask_layers))
    if seeds > 1:
        settings.update(seeds=seeds, aggregate=aggregate)
    if eps_auto is not None:
        settings["eps_auto"] = eps_auto
    D.check_agree({**settings, "checksum": float(images.double().sum())}, "the ANP settings and clean data")
    sampler, noise_generator = draws(images, labels, batch_size, seed, seeds, device=device, augment=augment,
                                     padding=padding, flip=flip)  # member k: those of the single run with seed + k
    channels_last = use_channels_last(channels_last, device, images)
    engine = ANPEngine(model, (seeds * local, *images.shape[1:]), device=device, eps=eps, steps=steps, alpha=alpha,
                       lr=lr, momentum=momentum, clamp_noise=clamp_noise, grouped=grouped,
                       channels_last=channels_last, precision=precision, mask_layers=mask_layers,
                       global_batch=seeds * batch_size, checkpoint=checkpoint, members=seeds,
                       fuse_relu=device.type == "cuda" if fused_relu is None else bool(fused_relu))
    if checkpoint and not engine.checkpointed:
        warnings.warn(f"checkpoint=True but {type(model).__name__} has no blocks to checkpoint (children of a "
                      "Sequential holding two or more layers with parameters); running without", UserWarning,
                      stacklevel=2)
    losses = torch.zeros(iterations, *engine.loss.shape, dtype=engine.loss.dtype, device=device)
    bar = None
    if progress and D.is_main():
        from tqdm.auto import tqdm
        bar = tqdm(total=iterations, desc="ANP", unit="it")
    reset_peak_memory(device)
    start = time.perf_counter()
    with tf32_enabled(tf32 and device.type == "cuda"):
        engine.set_micro_batch(_choose_micro_batch(engine, micro_batch == "auto", fixed, seeds * local))
        run = engine.capture() if use_graph else None
        info = dict(device=str(device), grouped=engine.grouped, cuda_graph=run is not None, channels_last=channels_last,
                    fused_relus=engine.fused_relus, fused_residuals=engine.fused_residuals,
                    tf32=tf32 and device.type == "cuda", precision=precision, backend=FP.backend_for(engine.images),
                    num_neurons=engine.arena.num_neurons, num_layers=len(engine.arena.layers),
                    layer_paths=layer_paths(engine.model), mask_layers=list(mask_layers),
                    micro_batch=engine.micro_batch, world_size=D.world_size(), members=seeds, batched=seeds > 1,
                    checkpointed_blocks=len(engine.checkpointed))
        done = 0
        for i in range(iterations):
            engine.iterate(sampler, noise_generator, run, shard if seeds == 1 else slice(None))
            losses[i] = engine.loss
            if (i + 1) % check_every == 0 or i + 1 == iterations:
                finite = bool(engine.finite)  # the one host synchronisation per check_every iterations
                if bar is not None:
                    bar.update(i + 1 - done)
                    bar.set_postfix(loss=f"{float(losses[i].mean()):.4f}")
                done = i + 1
                if not finite:
                    bad = int((~torch.isfinite(losses[:i + 1].reshape(i + 1, -1)).all(1)).nonzero()[0])
                    if bar is not None:
                        bar.close()
                    result = _result(engine, losses[:bad], time.perf_counter() - start, settings,
                                     {**info, "stopped_at": bad + 1, **peak_memory(device)}, aggregate)
                    raise ANPDiverged(bad + 1, result)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return _result(engine, losses, seconds, settings, {**info, **peak_memory(device)}, aggregate)


def _result(engine: ANPEngine, losses: torch.Tensor, seconds: float, settings: dict, info: dict,
            aggregate: str) -> ANPResult:
    """The run's result; for an ensemble every member's masks and losses and their aggregate."""
    if engine.members == 1:
        return ANPResult(engine.arena.masks(), losses.tolist(), seconds, settings, info)
    members = engine.arena.member_masks()
    return ANPResult(aggregate_masks(members, aggregate), losses.mean(1).tolist(), seconds, settings, info,
                     members=members, member_loss=losses.t().tolist())


def use_batched(batched: bool | None, device: torch.device) -> bool:
    """A seed ensemble as one batched run where it pays: by default on CUDA only. On a 2-core CPU
    (small CNN, 32 px, batch 128, K = 4; bench/results/anp-cpu-small_cnn-seeds4-2026-11-26.json) the
    batched run took 5.9x one seed's time per iteration against 4x for the members one after another
    (the 4x batch's activations are memory-bound there)."""
    return device.type == "cuda" if batched is None else bool(batched)


def _with_eps_record(result: ANPResult, eps_auto: dict | None) -> ANPResult:
    """``result`` with the record of how ``eps="auto"`` chose its eps in its settings."""
    if eps_auto is not None:
        result.settings["eps_auto"] = eps_auto
    return result


def _one_after_another(model: nn.Module, clean_data: Any, seed: int, seeds: int, aggregate: str, kw: dict) -> ANPResult:
    """A seed ensemble as ``seeds`` single runs, one after another (each exactly the run with its seed)."""
    runs = []
    for k in range(seeds):
        try:
            runs.append(anp(model, clean_data, seed=seed + k, **kw))
        except ANPDiverged as err:  # the members so far, and this one's last finite masks
            done = runs + [err.result]
            raise ANPDiverged(err.iteration, _combined(done, seed, seeds, aggregate)) from None
    return _combined(runs, seed, seeds, aggregate)


def _combined(runs: list[ANPResult], seed: int, seeds: int, aggregate: str) -> ANPResult:
    members = [r.masks for r in runs]
    n = min(len(r.loss) for r in runs)
    loss = [sum(r.loss[i] for r in runs) / len(runs) for i in range(n)]
    settings = {**runs[0].settings, "seed": seed, "seeds": seeds, "aggregate": aggregate}
    engine = {**runs[0].engine, "members": seeds, "batched": False,
              "peak_memory_bytes": max((r.engine.get("peak_memory_bytes") or 0) for r in runs) or None}
    return ANPResult(aggregate_masks(members, aggregate), loss, sum(r.seconds for r in runs), settings, engine,
                     members=members, member_loss=[r.loss for r in runs])


def _check_batched(seeds: int, micro_batch, checkpoint: bool) -> None:
    if seeds == 1:
        return
    if micro_batch is not None or checkpoint:
        raise InputError("a batched seed ensemble (seeds > 1, batched=True) is not combined with micro_batch or "
                         "checkpoint (it multiplies the batch by the number of seeds); use batched=False (the members "
                         "one after another)")
    if D.world_size() > 1:
        raise InputError("a batched seed ensemble (seeds > 1, batched=True) is not supported under a process group; "
                         "use batched=False (the members one after another)")
