"""The fast PGD engine: ``fastpurify.pgd(model, images, labels)``.

The same attack, keywords and random draws as :func:`fastpurify.reference.pgd` (torchattacks'
``PGD`` / ``PGDL2``), computed with less work:

1. the model's weights are frozen during the attack (``requires_grad`` off, restored after):
   each backward pass computes the input gradient only;
2. the images stay on the device and are attacked in memory-bounded chunks (halved on a CUDA
   out-of-memory error);
3. the update is one fused launch per step (``pgd_step_`` for L-inf, ``pgd_l2_step_`` for L2),
   and the random start one launch for all images;
4. the model sees each step's images in channels_last (on CUDA, and on the CPU for float32 /
   bfloat16 models, where oneDNN's convolutions and pooling are faster in it): one copy of the
   small input per step, the model's own weights untouched;
5. on CUDA the whole ``steps``-step loop of a chunk is captured in a CUDA graph (self-checked
   against an eager run) and replayed for every chunk of that shape; TF32 by default; bfloat16
   autocast on request (the loss and the update stay in float32);
6. on CUDA the model's eval-mode BatchNorms run through fastpurify's fused eval kernels
   (:mod:`fastpurify.eval_norms`: one streaming kernel each way in the activations' layout, where
   PyTorch's input gradient of an eval BatchNorm is non-vectorised on channels_last), with the
   ReLUs that are all they feed folded in (the model traced by torch.fx; self-checked against the
   model's own logits on the first chunk).

The model is in eval mode for the attack; every submodule's own flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from .. import functional as FP
from ..data import make_generator
from ..eval_norms import EvalNorms
from ..inference import eval_mode, frozen, model_device, model_dtype
from ..validation import InputError, check_images, check_labels, check_pgd_settings, check_positive_int
from .runtime import GraphCache, check_precision, logits_in, tf32_enabled, use_channels_last

GRAPH_MIN_CHUNKS = 8  # below this many full chunks a standalone attack is not worth capturing


class PGDAttack:
    """PGD against one model, chunk by chunk, on static per-shape buffers.

    Call it inside :meth:`prepared` (eval mode, frozen weights, gradients on). With
    ``cuda_graph`` the loop of a chunk shape is captured at that shape's ``capture_after``-th
    use and replayed from then on; the graph reads the model's parameters and buffers where
    they live, so it stays valid while an optimizer updates them in place (the PBE engine).
    ``channels_last``: hand the model each step's images in channels_last (the buffers and the
    update stay contiguous; the input gradient comes back through the copy). ``fused_norms``:
    route the model's eval-mode BatchNorms through the fused eval kernels during the attack
    (:class:`~fastpurify.eval_norms.EvalNorms`; None: on CUDA).
    """

    def __init__(self, model: nn.Module, *, eps: float, alpha: float, steps: int, norm: str = "linf",
                 lo: float = 0.0, hi: float = 1.0, precision: str = "fp32", cuda_graph: bool = False,
                 capture_after: int = 3, channels_last: bool = False, fused_norms: bool | None = None):
        check_pgd_settings(eps=eps, alpha=alpha, steps=steps, norm=norm, lo=lo, hi=hi)
        check_precision(precision)
        self.model, self.eps, self.alpha, self.steps, self.norm = model, eps, alpha, steps, norm
        self.lo, self.hi, self.precision = lo, hi, precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.device = model_device(model)
        self.graphs = GraphCache(cuda_graph, after=capture_after)
        use_norms = self.device.type == "cuda" if fused_norms is None else bool(fused_norms)
        self.norms = EvalNorms(model) if use_norms else None
        self._forward = model  # the model to run: inside ``prepared``, the fused norms' traced one
        self._folding_checked = self.norms is None or not self.norms.folded
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        norms = self.norms.active() if self.norms is not None else contextlib.nullcontext(self.model)
        with eval_mode(self.model), frozen(self.model), torch.enable_grad(), norms as forward:
            self._forward = forward
            try:
                yield
            finally:
                self._forward = self.model

    def keep_batches(self, sizes: set[int]) -> None:
        """Free the buffers and graphs of chunk shapes whose batch is not in ``sizes`` (say, an
        earlier extra set's last partial chunk, which will not come again)."""
        self.graphs.keep(lambda shape: shape[0] in sizes)
        self._buffers = {k: v for k, v in self._buffers.items() if k[0][0] in sizes}

    def _static(self, x0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (tuple(x0.shape), x0.dtype)
        if key not in self._buffers:
            adv = torch.zeros(x0.shape, dtype=x0.dtype, device=self.device, requires_grad=True)
            self._buffers[key] = (torch.zeros_like(adv, requires_grad=False), adv,
                                  torch.zeros(labels.shape, dtype=torch.long, device=self.device))
        return self._buffers[key]

    def _loop(self, x0: torch.Tensor, adv: torch.Tensor, labels: torch.Tensor) -> None:
        """``steps`` steps in place on the leaf ``adv`` (static tensors only: capturable)."""
        step = FP.pgd_step_ if self.norm == "linf" else FP.pgd_l2_step_
        for _ in range(self.steps):
            seen = adv.contiguous(memory_format=self.memory_format)
            loss = F.cross_entropy(logits_in(self._forward, seen, self.device, self.precision), labels)
            (grad,) = torch.autograd.grad(loss, adv)
            step(adv.data, x0, grad, self.alpha, self.eps, self.lo, self.hi)

    def __call__(self, x0: torch.Tensor, labels: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial examples of one chunk ``x0`` (a new tensor), from ``start`` (default x0)."""
        if not self._folding_checked:
            self._check_folding(x0)
        s_x0, s_adv, s_y = self._static(x0, labels)
        with torch.no_grad():
            s_x0.copy_(x0)
            s_adv.copy_(x0 if start is None else start)
            s_y.copy_(labels)
        self.graphs.run(tuple(x0.shape), lambda: self._loop(s_x0, s_adv, s_y), state=[s_adv], check=[s_adv])
        return s_adv.detach().clone()

    def _check_folding(self, x: torch.Tensor) -> None:
        """Once, on the first chunk: the traced model with the ReLUs folded into the norms gives the
        model's own logits; otherwise (a forward fx traced differently from how it runs) the
        attack runs the model as it is, with a warning."""
        self._folding_checked = True
        with torch.no_grad():
            seen = x.contiguous(memory_format=self.memory_format)
            folded = logits_in(self._forward, seen, self.device, self.precision).float()
            own = logits_in(self.model, seen, self.device, self.precision).float()
        if not torch.allclose(folded, own, rtol=1e-3, atol=1e-3 * (1.0 + float(own.abs().max()))):
            warnings.warn("the model traced with its ReLUs folded into the BatchNorms computes other logits than "
                          "the model: PGD runs the model as it is", RuntimeWarning, stacklevel=3)
            self.norms.unfold()
            self._forward = self.model

    def attack(self, images: torch.Tensor, labels: torch.Tensor, *, random_start: bool,
               generator: torch.Generator | None, batch_size: int, bar=None, shard: bool = False) -> torch.Tensor:
        """Adversarial examples of all ``images`` (on the device), in chunks of ``batch_size``;
        the random start is one draw for all images, so the chunking does not change results.
        On a CUDA out-of-memory error the chunk size is halved (with a warning) and the chunk retried.
        ``shard``: under a process group, each rank attacks its share of the images and every
        rank gets all of them back (the same result: each image's attack is its own)."""
        start = FP.pgd_random_start(images, self.eps, self.lo, self.hi, generator, self.norm) if random_start \
            else images
        if shard and D.world_size() > 1:
            rows = D.shard(images.shape[0], "images to attack")
            mine = self._chunked(images[rows], labels[rows], start[rows], batch_size, bar)
            return D.all_gather_rows(mine, images.shape[0])
        return self._chunked(images, labels, start, batch_size, bar)

    def _chunked(self, images: torch.Tensor, labels: torch.Tensor, start: torch.Tensor, batch_size: int,
                 bar) -> torch.Tensor:
        out = torch.empty_like(images)
        n, size, s = images.shape[0], batch_size, 0
        with self.prepared():
            while s < n:
                stop = min(n, s + size)
                try:
                    out[s:stop] = self(images[s:stop], labels[s:stop], start[s:stop])
                except torch.cuda.OutOfMemoryError:
                    if size == 1:
                        raise
                    size = max(1, size // 2)
                    self._buffers.clear()  # and the graphs that read them
                    self.graphs = GraphCache(self.graphs.enabled, self.graphs.after)
                    torch.cuda.empty_cache()
                    warnings.warn(f"PGD ran out of GPU memory; attacking {size} image(s) at a time", RuntimeWarning,
                                  stacklevel=2)
                    continue
                if bar is not None:
                    bar.update(stop - s)
                s = stop
        return out


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 8 / 255,
        alpha: float = 2 / 255, steps: int = 10, random_start: bool = True, norm: str = "linf", lo: float = 0.0,
        hi: float = 1.0, seed: int | None = None, generator: torch.Generator | None = None, batch_size: int = 512,
        cuda_graph: bool | None = None, channels_last: bool | None = None, tf32: bool = True,
        precision: str = "fp32", fused_norms: bool | None = None, progress: bool = False) -> torch.Tensor:
    """Untargeted PGD examples of ``images`` (N, C, H, W, pixels in [lo, hi]) that raise the
    model's cross-entropy on ``labels``; returned detached on the images' device.

    The keywords up to ``generator`` mean what they mean in :func:`fastpurify.reference.pgd`,
    with the same defaults and, for one seed, the same random start. The attack runs on the
    model's device; the model comes back as it was (training flags, ``requires_grad``) and its
    parameters get no ``.grad``. Speed options: ``batch_size`` (images per chunk; halved on a
    CUDA out-of-memory error), ``cuda_graph`` (None: on CUDA when there are at least
    8 full chunks), ``channels_last`` (the images the model sees; None: on CUDA, and on the CPU
    for a float32 or bfloat16 model; the model itself is not converted), ``tf32``, ``precision``
    ("fp32" or "bf16" autocast), ``fused_norms`` (the model's eval-mode BatchNorms through
    fastpurify's fused eval kernels; None: on CUDA), ``progress``. Under an
    initialised ``torch.distributed`` process group each rank attacks its share of the images
    and every rank returns all of them.
    """
    check_pgd_settings(eps=eps, alpha=alpha, steps=steps, norm=norm, lo=lo, hi=hi, random_start=random_start)
    check_images(images)
    check_labels(labels, num_images=images.shape[0])
    check_positive_int(batch_size, "batch_size")
    check_precision(precision)
    lo_seen, hi_seen = float(images.min()), float(images.max())
    if lo_seen < lo or hi_seen > hi:
        raise InputError(f"images must lie in the pixel range [{lo}, {hi}], found [{lo_seen:.4g}, {hi_seen:.4g}]")
    if seed is not None and generator is not None:
        raise InputError("give a seed or a generator for the random start, not both")
    device = model_device(model)
    if cuda_graph and device.type != "cuda":
        raise InputError(f"cuda_graph=True needs a model on a CUDA device; the model is on {device}")
    full_chunks = images.shape[0] // batch_size
    use_graph = (device.type == "cuda" and full_chunks >= GRAPH_MIN_CHUNKS) if cuda_graph is None else bool(cuda_graph)
    x0 = images.detach().to(device).contiguous()
    y = labels.to(device)
    if generator is None and seed is not None:
        generator = make_generator(seed, device)
    channels_last = use_channels_last(channels_last, device, x0, model_dtype(model))
    engine = PGDAttack(model, eps=eps, alpha=alpha, steps=steps, norm=norm, lo=lo, hi=hi, precision=precision,
                       cuda_graph=use_graph, capture_after=1, channels_last=channels_last, fused_norms=fused_norms)
    bar = None
    if progress and D.is_main():
        from tqdm.auto import tqdm
        rows = D.shard(x0.shape[0], "images to attack")
        bar = tqdm(total=rows.stop - rows.start, desc=f"PGD-{steps}", unit="img")
    try:
        with tf32_enabled(tf32 and device.type == "cuda"):
            adv = engine.attack(x0, y, random_start=random_start, generator=generator, batch_size=batch_size, bar=bar,
                                shard=True)
    finally:
        if bar is not None:
            bar.close()
    return adv.to(images.device)
