"""The fast PBE engine: ``purified, report = fastpurify.pbe(model, train_data, clean_data)``.

The same rounds, keywords, defaults and random draws as :func:`fastpurify.reference.pbe`
(laid out in :mod:`fastpurify.purification`), computed with less work:

1. PGD runs on the frozen model (input gradients only) through :class:`PGDAttack`: fused
   steps, one random-start draw, chunks of ``pgd_batch_size`` images; on CUDA the loop of each
   recurring chunk shape is a CUDA graph, reused for the whole run (it reads the parameters
   in place, so it follows the fine-tuning);
2. all data stays on the device; batches are augmented there (``DeviceBatchSampler``);
3. on CUDA each recurring training-batch shape's step (forward, backward, SGD update) is a
   CUDA graph; convolutions use TF32, ``precision="bf16"`` runs the forward passes under
   bfloat16 autocast; the SGD update is PyTorch's fused kernel; the model copy is channels_last
   on CUDA and, for a float32 model, on the CPU (oneDNN is faster in it; float64 stays NCHW);
4. the infected model's logits on the training set are computed once; each round scores the
   training set chunk by chunk with the fused ``logits_cosine`` and ranks it on the device.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from .. import functional as FP
from ..data import DeviceBatchSampler, make_generator
from ..inference import eval_mode
from ..purification import (DEFAULT_SCHEDULE, PBEPlan, PBEReport, PBEResult, PBERound, RoundClock, RoundSpec,
                            adversarial_labels, finish_round, initial_subset, measure, midround_measure, next_subset,
                            needs_losses, plan_pbe, resolve_auto)
from ..ranking import rank_descending
from ..validation import InputError, check_positive_int
from .checkpointing import checkpoint_blocks, remove_checkpointing
from .pgd import PGDAttack
from .runtime import (GraphCache, check_micro_batch, check_precision, logits_in, peak_memory, reset_peak_memory,
                      resolve_device, tf32_enabled, to_memory_format, use_channels_last)


class FineTuner:
    """SGD fine-tuning of ``model`` on static per-shape batch buffers; on CUDA the step of a
    recurring batch shape is captured in a CUDA graph (self-checked against an eager step).

    With ``micro_batch`` (or under a process group) a batch is cut into consecutive
    micro-batches of that size, this process takes its share of them (all of them in one
    process), and the step accumulates their gradients, each weighted by its share of the batch,
    then sums the gradients over the ranks in one all-reduce: the update is the whole batch's.
    BatchNorm normalises each micro-batch with its own statistics, and the running statistics
    move by the average of the micro-batches' updates (exactly what data-parallel ranks with
    averaged buffers do); these steps run eagerly.
    """

    def __init__(self, model: nn.Module, *, lr: float, momentum: float, weight_decay: float, precision: str,
                 cuda_graph: bool, memory_format: torch.memory_format, micro_batch: int | None = None):
        self.model, self.precision, self.memory_format = model, precision, memory_format
        self.device = next(model.parameters()).device
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                         **fused)
        self.graphs = GraphCache(cuda_graph)
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps = 0
        self.micro_batch = micro_batch
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._statistics = [b for m in norms for b in (m.running_mean, m.running_var) if b is not None]
        self._counters = [m.num_batches_tracked for m in norms if m.num_batches_tracked is not None]

    def _static(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(x.shape)
        if key not in self._buffers:
            self._buffers[key] = (torch.zeros_like(x, memory_format=self.memory_format), torch.zeros_like(y))
        return self._buffers[key]

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(logits_in(self.model, x, self.device, self.precision), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def keep_batches(self, sizes: set[int]) -> None:
        """Free the buffers and graphs of batch shapes whose batch is not in ``sizes``."""
        self.graphs.keep(lambda shape: shape[0] in sizes)
        self._buffers = {k: v for k, v in self._buffers.items() if k[0] in sizes}

    def _state(self) -> list[torch.Tensor]:
        momenta = [s["momentum_buffer"] for s in self.optimizer.state.values()
                   if s.get("momentum_buffer") is not None]
        return [*self.model.parameters(), *self.model.buffers(), *momenta]

    def _accumulated_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        n = x.shape[0]
        parts = [slice(s, min(n, s + self.micro_batch)) for s in range(0, n, self.micro_batch)]
        mine = parts[D.part_of(len(parts))]
        params = [p for p in self.model.parameters() if p.requires_grad]
        stats = [t.detach().clone() for t in self._statistics]
        counters = [t.clone() for t in self._counters]
        sums = [torch.zeros_like(t) for t in stats]
        self.optimizer.zero_grad(set_to_none=True)
        for part in mine:
            self._restore(stats, counters)
            loss = F.cross_entropy(logits_in(self.model, x[part], self.device, self.precision), y[part])
            (loss * ((part.stop - part.start) / n)).backward()
            with torch.no_grad():
                for total, t in zip(sums, self._statistics):
                    total.add_(t)
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = D.all_reduce_sum_(torch.cat([t.reshape(-1) for t in grads + sums]))
            for t, value in zip(grads + sums, flat.split([t.numel() for t in grads + sums])):
                t.copy_(value.view_as(t))
            for p, g in zip(params, grads):
                p.grad = g
            self._restore([total / len(parts) for total in sums], [c + 1 for c in counters])
        self.optimizer.step()

    @torch.no_grad()
    def _restore(self, stats: list[torch.Tensor], counters: list[torch.Tensor]) -> None:
        for t, value in zip(self._statistics + self._counters, stats + counters):
            t.copy_(value)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One training step on the batch (the model in train mode)."""
        self.model.train()
        if self.micro_batch is not None and (self.micro_batch < x.shape[0] or D.world_size() > 1):
            self._accumulated_step(x, y)
            self.steps += 1
            return
        s_x, s_y = self._static(x, y)
        with torch.no_grad():
            s_x.copy_(x)
            s_y.copy_(y)
        if self.steps == 0:  # the first step creates the momentum buffers a graph would update
            self._step(s_x, s_y)
        else:
            params = list(self.model.parameters())
            self.graphs.run(tuple(x.shape), lambda: self._step(s_x, s_y), state=self._state(), check=params)
        self.steps += 1


class PBEEngine:
    """A copy of the model on ``device`` (channels_last on request), its fine-tuner, its attack
    and its scorer: one PBE round at a time."""

    def __init__(self, model: nn.Module, plan: PBEPlan, *, device: torch.device, channels_last: bool,
                 cuda_graph: bool, precision: str, pgd_batch_size: int, score_batch_size: int,
                 micro_batch: int | None = None, checkpoint: bool = False, fused_norms: bool | None = None):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = to_memory_format(copy.deepcopy(model).to(device), channels_last)  # a copy; never the caller's
        self.checkpointed = checkpoint_blocks(self.model) if checkpoint else []
        self.plan, self.device, self.precision = plan, device, precision
        self.pgd_batch_size, self.score_batch_size = pgd_batch_size, score_batch_size
        # the "auto" eps, flip and padding, from this copy before any update, in PGD-sized chunks
        resolve_auto(plan, self.model, pgd_batch_size)
        D.check_agree({k: plan.cfg[k] for k in ("eps", "alpha", "flip", "padding")}, "the 'auto' PBE settings")
        cfg, opt = plan.cfg, plan.optimizer
        self.tuner = FineTuner(self.model, lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"],
                               precision=precision, cuda_graph=cuda_graph, memory_format=memory_format,
                               micro_batch=micro_batch)
        self.attack = PGDAttack(self.model, eps=cfg["eps"], alpha=cfg["alpha"], steps=cfg["pgd_steps"],
                                precision=precision, cuda_graph=cuda_graph, fused_norms=fused_norms)
        self.generator = make_generator(plan.seed, device)

    def _sampler(self, images: torch.Tensor, labels: torch.Tensor) -> DeviceBatchSampler:
        cfg = self.plan.cfg
        return DeviceBatchSampler(images, labels, cfg["batch_size"], generator=self.generator, augment=cfg["augment"],
                                  padding=cfg["padding"], flip=cfg["flip"])

    def purify(self, images: torch.Tensor, labels: torch.Tensor, spec: RoundSpec, bar=None,
               after_adversarial=None) -> None:
        """One round on the extra set: adversarial epochs (only the first ``spec.adv_batches``
        batches adversarial, when set), then clean epochs; ``after_adversarial()`` between them."""
        cfg = self.plan.cfg
        full = {cfg["batch_size"], self.pgd_batch_size}  # the last partial batches of earlier rounds never return
        self.tuner.keep_batches(full)
        self.attack.keep_batches(full)
        per_round = cfg["regenerate"] == "round"
        adversarial = None
        if per_round and spec.adv_epochs:
            adversarial = self.attack.attack(images, labels, random_start=cfg["random_start"],
                                             generator=self.generator, batch_size=self.pgd_batch_size, shard=True)
        clean = self._sampler(images, labels)  # drawing happens per epoch, so one sampler per set serves them all
        attacked = self._sampler(adversarial, labels) if adversarial is not None else clean
        left = spec.adv_batches  # per-batch PGD only: adversarial batches still to come (None: all)
        for epoch in range(spec.epochs):
            in_adv = epoch < spec.adv_epochs
            for x, y in attacked if in_adv else clean:
                if in_adv and not per_round and (left is None or left > 0):
                    x = self.attack.attack(x, y, random_start=cfg["random_start"], generator=self.generator,
                                           batch_size=x.shape[0], shard=True)
                    left = None if left is None else left - 1
                self.tuner(x, y)
            if bar is not None:
                bar.update(1)
            if epoch == spec.adv_epochs - 1 and spec.clean_epochs and after_adversarial is not None:
                after_adversarial()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The current model's logits on this process's share of ``images`` (all of them in one
        process), in chunks, eval mode (float32; float64 for a float64 model)."""
        mine = images[D.shard(images.shape[0], "images to score")]
        outs = []
        with eval_mode(self.model):
            for s in range(0, mine.shape[0], self.score_batch_size):
                outs.append(self._forward(mine[s:s + self.score_batch_size]))
        return torch.cat(outs)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, infected: torch.Tensor) -> torch.Tensor:
        """cos(infected logits, current logits) per image, chunk by chunk (no full logit copy);
        ``infected`` holds this process's share (from :meth:`logits`). Under a process group
        each rank scores its share and every rank gets all the scores."""
        n = images.shape[0]
        mine = images[D.shard(n, "images to score")]
        out = torch.empty(mine.shape[0], dtype=infected.dtype, device=images.device)
        with eval_mode(self.model):
            for s in range(0, mine.shape[0], self.score_batch_size):
                stop = min(mine.shape[0], s + self.score_batch_size)
                out[s:stop] = FP.logits_cosine(infected[s:stop], self._forward(mine[s:stop]))
        return D.all_gather_rows(out, n)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_in(self.model, x, self.device, self.precision)


def pbe(model: nn.Module, train_data: Any = None, clean_data: Any = None, *,
        poison_indices: torch.Tensor | None = None, test_data: Any = None, attack: Any = None,
        eps: float | str = "auto", alpha: float | None = None, pgd_steps: int = 7, random_start: bool = False,
        regenerate: str | None = None, adv_epochs: int | Sequence[int] | None = None,
        clean_epochs: int | Sequence[int] | None = None,
        adv_batches: int | None | Sequence[int | None] = None, recipe: str | None = None, initial: str = "random",
        exclude_low_loss: float | None = None, lr: float | None = None,
        momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128, augment: bool = True,
        padding: int | str = "auto", flip: bool | str = "auto", schedule: Sequence[float] = DEFAULT_SCHEDULE,
        seed: int = 0,
        progress: bool = True, device: torch.device | str | None = None, cuda_graph: bool | None = None,
        channels_last: bool | None = None, tf32: bool = True, precision: str = "fp32",
        pgd_batch_size: int | None = None, score_batch_size: int = 1024, micro_batch: int | None = None,
        checkpoint: bool = False, fused_norms: bool | None = None) -> PBEResult:
    """Purify a copy of ``model`` with PBE; returns ``(purified, report)`` (a :class:`PBEResult`).

    With ``clean_data`` (a clean extra set): one round on it. Without: the progressive setting
    on ``train_data`` (the possibly poisoned training set): ``len(schedule)`` rounds on growing
    extra sets of the images that look cleanest. ``poison_indices`` (ground truth, evaluation
    only) adds each extra set's poisoned share and each ranking's average precision;
    ``test_data`` adds ACC per round and ``attack`` (a :mod:`fastpurify.backdoor` attack) the ASR.
    The keywords up to ``progress`` mean what they mean in :func:`fastpurify.reference.pbe`, with
    the same defaults and, for one seed, the same random draws. ``eps``, ``flip`` and
    ``padding`` "auto" (the defaults) are chosen from the infected model and the extra set before
    any fine-tuning (:mod:`fastpurify.calibration`: the paper's 6/255, crop padding 4 and flips
    on 32-pixel photographs; a larger bound where 6/255 makes few adversarial examples, no flips
    for a model that is not flip-invariant; ``report.settings["calibration"]`` says how).
    ``alpha=None`` is ``eps / 5``; ``lr=None`` is 1e-3 in the progressive setting (the authors')
    and 1e-2 with a clean extra set or ``initial="high-loss"`` (fastpurify's:
    :func:`fastpurify.purification.default_lr`);
    ``regenerate``: "round" (PGD examples once per round, the paper) or "batch" (every batch,
    the authors' code). ``adv_epochs``, ``clean_epochs`` and ``adv_batches`` (per-batch PGD
    only: the round's first that many batches adversarial, the rest clean) are one value for
    every round or one per round; ``recipe="authors"`` sets them and ``regenerate`` to the
    authors' scripts' (:data:`fastpurify.purification.RECIPES`). With ``test_data`` each round
    also records ACC / ASR after its adversarial epochs, and the report how the infected model
    labels its PGD examples (``report.adversarial_labels``). ``initial``: round 0's extra set
    drawn from the whole training set ("random", the paper) or from the half the infected model
    fits least ("high-loss", fastpurify's own: :func:`fastpurify.purification.initial_subset`).
    ``exclude_low_loss`` (fastpurify's own): the share of the training images the infected model
    fits best (lowest loss) kept out of every round's extra set, so that the poisoned images it
    fits through the trigger cannot come back in the later rounds; None is 0.2 with
    ``initial="high-loss"`` and 0 with the paper's random round 0
    (:func:`fastpurify.purification.default_exclude_low_loss`).
    Speed options: ``device`` (default: CUDA if available),
    ``cuda_graph`` (None: on CUDA), ``channels_last`` (None: on CUDA, and on the CPU for a
    float32 or bfloat16 model), ``tf32``, ``precision`` ("fp32"/"bf16"), ``fused_norms`` (PGD
    through the model's eval-mode BatchNorms on fastpurify's fused eval kernels,
    :mod:`fastpurify.eval_norms`; None: on CUDA),
    ``pgd_batch_size`` (images per PGD chunk; None: 512 on CUDA, ``batch_size`` on the CPU, where
    large chunks only thrash the caches) and ``score_batch_size``. ``model`` is never modified.

    Memory: ``micro_batch`` (a divisor of ``batch_size``) fine-tunes each batch in micro-batches
    with accumulated gradients (BatchNorm statistics per micro-batch, a declared approximation:
    docs/large-models.md) and caps the PGD and scoring chunks at it; ``checkpoint`` recomputes
    each block's activations in the backward passes. Under an initialised ``torch.distributed``
    process group (e.g. ``torchrun``) the run is data-parallel: PGD generation and scoring are
    sharded over the ranks and gathered, and every batch is fine-tuned as micro-batches of
    ``micro_batch`` (default ``batch_size / world_size``) shared out over the ranks, gradients
    and BatchNorm running statistics summed in one all-reduce: the same result as one process
    with that ``micro_batch``.
    """
    check_precision(precision)
    check_positive_int(score_batch_size, "score_batch_size")
    world = D.world_size()
    if world > 1 and micro_batch is None:
        if batch_size % world:
            raise InputError(f"batch_size {batch_size} must be divisible by the world size {world} (each rank "
                             "fine-tunes an equal share of every batch); or give micro_batch")
        micro_batch = batch_size // world
    check_micro_batch(micro_batch, batch_size)
    device = D.local_device(device) if world > 1 else resolve_device(device)
    if pgd_batch_size is None:
        pgd_batch_size = 512 if device.type == "cuda" else batch_size
        pgd_batch_size = min(pgd_batch_size, micro_batch or pgd_batch_size)
    if micro_batch is not None:
        score_batch_size = min(score_batch_size, micro_batch)
    check_positive_int(pgd_batch_size, "pgd_batch_size")
    if cuda_graph and device.type != "cuda":
        raise InputError(f"cuda_graph=True needs a CUDA device; the engine runs on {device}")
    use_graph = device.type == "cuda" and world == 1 if cuda_graph is None else bool(cuda_graph)
    plan = plan_pbe(model, train_data, clean_data, device=device, poison_indices=poison_indices,
                    test_data=test_data, attack=attack, eps=eps, alpha=alpha, pgd_steps=pgd_steps,
                    random_start=random_start, regenerate=regenerate, adv_epochs=adv_epochs, clean_epochs=clean_epochs,
                    lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, augment=augment,
                    padding=padding, flip=flip, schedule=schedule, seed=seed, adv_batches=adv_batches, recipe=recipe,
                    initial=initial, exclude_low_loss=exclude_low_loss)
    D.check_agree({**plan.settings, "micro_batch": micro_batch, "checksum": float(plan.images.double().sum())},
                  "the PBE settings and data")
    if world > plan.images.shape[0]:
        raise InputError(f"the world size {world} is larger than the {plan.images.shape[0]} images to purify on: "
                         "every rank needs at least one; use fewer processes")
    channels_last = use_channels_last(channels_last, device, plan.images)
    reset_peak_memory(device)
    with tf32_enabled(tf32 and device.type == "cuda"):
        engine = PBEEngine(model, plan, device=device, channels_last=channels_last, cuda_graph=use_graph,
                           precision=precision, pgd_batch_size=pgd_batch_size, score_batch_size=score_batch_size,
                           micro_batch=micro_batch, checkpoint=checkpoint, fused_norms=fused_norms)
        report = PBEReport(settings=plan.settings, before=measure(engine.model, plan), poisoned=plan.poisoned)
        if plan.test is not None:
            report.adversarial_labels = adversarial_labels(engine.model, plan)
        bar = None
        if progress and D.is_main():
            from tqdm.auto import tqdm
            bar = tqdm(total=plan.total_epochs, desc="PBE", unit="epoch")
        try:
            clock = RoundClock(device)
            if not plan.progressive:
                info = PBERound(0, None, None, size=plan.images.shape[0])
                engine.purify(plan.images, plan.labels, plan.specs[0], bar,
                              lambda: midround_measure(info, plan, engine.model, clock))
                finish_round(info, plan, engine.model, clock, report)
            else:
                _progressive(engine, plan, clock, report, bar)
        finally:
            if bar is not None:
                bar.close()
    report.engine = dict(name="fast", device=str(device), backend=FP.backend_for(plan.images),
                         cuda_graph=use_graph,
                         graphs_captured=engine.tuner.graphs.captured + engine.attack.graphs.captured,
                         channels_last=channels_last, tf32=tf32 and device.type == "cuda", precision=precision,
                         micro_batch=micro_batch, world_size=world, checkpointed_blocks=len(engine.checkpointed),
                         **peak_memory(device))
    return PBEResult(remove_checkpointing(engine.model), report)


def _progressive(engine: PBEEngine, plan: PBEPlan, clock: RoundClock, report: PBEReport, bar) -> None:
    infected = engine.logits(plan.images)  # once: the infected model is the copy before any update
    losses = None
    if needs_losses(plan):
        mine = plan.labels[D.shard(plan.labels.shape[0], "images to score")]
        losses = D.all_gather_rows(F.cross_entropy(infected, mine, reduction="none"), plan.labels.shape[0])
    chosen = initial_subset(plan, engine.generator, losses)
    for r, fraction in enumerate(plan.fractions):
        if r > 0:
            clock.start()
            chosen = next_subset(plan, r, report.ranking, losses)
        info = PBERound(r, fraction, chosen, size=int(chosen.numel()))
        engine.purify(plan.images[chosen], plan.labels[chosen], plan.specs[r], bar,
                      lambda: midround_measure(info, plan, engine.model, clock))
        info.scores = engine.scores(plan.images, infected)
        info.ranking = rank_descending(info.scores)
        finish_round(info, plan, engine.model, clock, report)
