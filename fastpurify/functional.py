"""The fused operations of fastpurify, as functions and autograd Functions.

One dispatch rule for the whole package (:func:`backend_for`): the Triton kernels on CUDA
tensors, the same kernels through Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1``,
otherwise a pure-PyTorch path with identical semantics. ``FASTPURIFY_BACKEND=torch|triton``
forces one. Kernels are imported lazily, so importing fastpurify never imports triton.

Precision: float64 tensors are loaded, reduced and stored in float64, but compiled Triton passes
the Python-float hyperparameters (eps, momentum, step sizes, bounds) as float32 scalars, so a
float64 result on a GPU carries their float32 rounding (relative ~1e-8); the interpreter and the
PyTorch path keep them float64.

Argument checks: every public function validates its arguments (clear errors for bad input)
unless called inside :func:`argument_checks` ``(False)``, which the ANP engine uses for its hot
loop after one checked iteration (the checks cost ~2 % of a small CNN's iteration on the CPU,
more where the kernels are fast); the argument normalisation (default weight and bias, noise
rows) runs either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .kernels.runtime import interpreting, triton_available
from .validation import InputError, check_positive

BACKENDS = ("auto", "torch", "triton")
_CHECKS = contextvars.ContextVar("fastpurify_argument_checks", default=True)


@contextlib.contextmanager
def argument_checks(enabled: bool) -> Iterator[None]:
    """Within the block, the perturbed norms' and affine's argument checks run only if ``enabled``
    (for a caller that has already run the same calls checked, such as an engine's hot loop)."""
    token = _CHECKS.set(enabled)
    try:
        yield
    finally:
        _CHECKS.reset(token)


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
def backend_for(*tensors: torch.Tensor | None) -> str:
    """``"triton"`` or ``"torch"`` for an operation on these tensors."""
    choice = os.environ.get("FASTPURIFY_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise InputError(f"FASTPURIFY_BACKEND must be one of {BACKENDS}, got {choice!r}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if choice == "torch":
        return "torch"
    runnable = triton_available() and (on_cuda or interpreting())
    if choice == "triton" and not runnable:
        why = "triton is not installed" if not triton_available() else \
            "the tensors are on the CPU and TRITON_INTERPRET=1 is not set (set it before triton is imported)"
        raise InputError(f"FASTPURIFY_BACKEND=triton but the kernels cannot run: {why}")
    return "triton" if runnable else "torch"


def _check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise InputError(f"all tensors must be on one device, got {listing}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise InputError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")


# ---------------------------------------------------------------------------------------------
# Masked-and-perturbed BatchNorm
# ---------------------------------------------------------------------------------------------
def perturbed_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         mask: torch.Tensor, noise: torch.Tensor | None = None,
                         noise_bias: torch.Tensor | None = None, running_mean: torch.Tensor | None = None,
                         running_var: torch.Tensor | None = None, training: bool = True, momentum: float = 0.1,
                         eps: float = 1e-5, groups: int = 1, relu: bool = False,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """BatchNorm whose scale is ``weight * (mask + noise[g])`` and shift ``bias * (1 + noise_bias[g])``;
    with ``relu``, ReLU of that (fused: the backward recomputes where the output is positive from
    x, so nothing more is kept, and the ReLU costs no pass of its own); with ``residual`` (only
    with ``relu``; x's shape, dtype and device), ReLU(BatchNorm(x) + residual), a ResNet block's
    end in one pass, the residual's gradient written beside x's.

    ``x`` is (N, C) or (N, C, *spatial), contiguous or channels_last. The batch is ``groups``
    equal contiguous chunks, each normalised with its own statistics in training mode (exactly
    as separate forward passes). ``noise``/``noise_bias`` are (groups, C), (C,) for one group, or
    None; their rows may be strided views (e.g. into one flat arena of the whole network). Running statistics are updated in place only when given and ``training`` (group by
    group, unbiased variance). Gradients flow to x, mask, noise, noise_bias, and to weight/bias
    only when they require grad. Statistics and reductions are in float32 (float64 for float64).
    """
    if _CHECKS.get():
        _check_batch_norm(x, weight, bias, mask, noise, noise_bias, running_mean, running_var, training, eps, groups)
        _check_residual(x, residual, relu)
    c = x.shape[1]
    if weight is None:
        weight = torch.ones(c, dtype=mask.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(c, dtype=mask.dtype, device=x.device)
    noise, noise_bias = _rows(noise, groups, c), _rows(noise_bias, groups, c)
    if backend_for(x) == "triton":
        return _PerturbedBatchNorm.apply(x, weight, bias, mask, noise, noise_bias, running_mean, running_var,
                                         training, momentum, eps, groups, relu, residual)
    y = _perturbed_batch_norm_torch(x, weight, bias, mask, noise, noise_bias, running_mean, running_var,
                                    training, momentum, eps, groups)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def _check_residual(x: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> None:
    if residual is None:
        return
    if not relu:
        raise InputError("residual is taken with relu=True only (ReLU(BatchNorm(x) + residual)); add it yourself "
                         "otherwise")
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.dtype != x.dtype \
            or residual.device != x.device:
        got = (f"{tuple(residual.shape)} {residual.dtype} on {residual.device}" if isinstance(residual, torch.Tensor)
               else type(residual).__name__)
        raise InputError(f"residual must be a tensor of x's shape, dtype and device ({tuple(x.shape)} {x.dtype} on "
                         f"{x.device}), got {got}")


def _check_batch_norm(x, weight, bias, mask, noise, noise_bias, running_mean, running_var, training, eps, groups):
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise InputError(f"x must be a tensor (N, C) or (N, C, *spatial), got shape {tuple(getattr(x, 'shape', ()))}")
    _check_float("x", x)
    n, c = x.shape[:2]
    _check_same_device(x=x, weight=weight, bias=bias, mask=mask, noise=noise, noise_bias=noise_bias,
                       running_mean=running_mean, running_var=running_var)
    _check_groups(n, groups)
    check_positive(eps, "eps")
    _check_vectors(c, "channels", weight=weight, bias=bias, mask=mask, running_mean=running_mean,
                   running_var=running_var)
    _check_rows(noise, "noise", groups, c)
    _check_rows(noise_bias, "noise_bias", groups, c)
    if training:
        if (n // groups) * x[0, 0].numel() < 2:
            raise InputError(f"training-mode BatchNorm needs more than one value per channel in each group: "
                             f"got {n // groups} sample(s) of {x[0, 0].numel()} value(s) per group")
    elif running_mean is None or running_var is None:
        raise InputError("eval mode (training=False) normalises with the running statistics: give running_mean "
                         "and running_var")


def _check_groups(n: int, groups) -> None:
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or n % groups:
        raise InputError(f"groups must be a positive integer dividing the batch size {n}, got {groups!r}")


def _check_vectors(c: int, unit: str, **tensors: torch.Tensor | None) -> None:
    """Each given tensor must be a floating (C,) vector (``unit`` names what C counts)."""
    for name, t in tensors.items():
        if t is not None:
            _check_float(name, t)
            if tuple(t.shape) != (c,):
                raise InputError(f"{name} must have shape ({c},) for {c} {unit}, got {tuple(t.shape)}")


def group_affine(weight, bias, mask, noise, noise_bias, groups: int, c: int):
    """Each batch group's scale ``weight * (mask + noise[g])`` (G, C) and shift ``bias * (1 + noise_bias[g])``
    (G, C), or None without a bias; a None weight is ones, None noises are zeros; ``noise``/``noise_bias``
    are (groups, C). With mask 1 and no noise, row g is bitwise ``weight`` and ``bias``: the one place
    the ANP affine rule is computed outside the kernels."""
    scale = mask.expand(groups, c) if noise is None else mask + noise
    if weight is not None:
        scale = weight * scale
    shift = None if bias is None else (bias.expand(groups, c) if noise_bias is None else bias * (1 + noise_bias))
    return scale, shift


def _check_rows(t: torch.Tensor | None, name: str, groups: int, c: int) -> None:
    """A noise is None, (groups, C), or (C,) for one group."""
    if t is None:
        return
    _check_float(name, t)
    if tuple(t.shape) != (groups, c) and not (groups == 1 and tuple(t.shape) == (c,)):
        raise InputError(f"{name} must have shape ({groups}, {c}) (groups, channels)"
                         f"{' or (' + str(c) + ',)' if groups == 1 else ''}, got {tuple(t.shape)}")


def _rows(t: torch.Tensor | None, groups: int, c: int) -> torch.Tensor | None:
    """A checked noise as (groups, C) rows (or None)."""
    if t is None:
        return None
    if t.dim() == 1:
        t = t.unsqueeze(0)
    # Rows may be strided (views into a flat arena); channels must be contiguous for the kernels.
    return t if t.stride(-1) == 1 or c == 1 else t.contiguous()


def _perturbed_batch_norm_torch(x, weight, bias, mask, noise, noise_bias, running_mean, running_var, training,
                                momentum, eps, groups):
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale, shift = group_affine(weight, bias, mask, noise, noise_bias, groups, x.shape[1])
    outs = []
    for g, xg in enumerate(x.chunk(groups)):
        y = F.batch_norm(xg.to(compute), running_mean, running_var, scale[g].to(compute), shift[g].to(compute),
                         training, momentum, eps)
        outs.append(y.to(x.dtype))
    return outs[0] if groups == 1 else torch.cat(outs)


def _ncs(t: torch.Tensor) -> torch.Tensor:
    """A (N, C, S) view of ``t`` (spatial axes merged), copying only if they cannot be merged."""
    n, c = t.shape[:2]
    try:
        return t.view(n, c, -1)
    except RuntimeError:
        return t.contiguous().view(n, c, -1)


def _param_grad_buffers(ctx, weight, bias, mask, noise, noise_bias) -> list[torch.Tensor | None]:
    """For a norm's autograd Function whose inputs 1 to 5 are weight, bias, mask, noise and
    noise_bias: a new contiguous buffer (whatever the strides of the parameter) for each of their
    gradients that autograd needs, None for the others (absent or not needed: no work spent on it)."""
    params = (weight, bias, mask, noise, noise_bias)
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) if need and t is not None else None
            for t, need in zip(params, ctx.needs_input_grad[1:6])]


class _PerturbedBatchNorm(torch.autograd.Function):
    """The Triton path: one fused forward kernel and one fused backward kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, noise, noise_bias, running_mean, running_var, training, momentum,
                eps, groups, relu, residual):
        from .kernels.batch_norm import bn_forward

        x3 = _ncs(x)
        r3 = None if residual is None else _ncs(residual)
        # y is allocated in x's memory format (dense) and returned itself, not a view of it:
        # the caller may modify it in place (e.g. ReLU(inplace=True)).
        y = torch.empty_like(x)
        y3 = y.view(x3.shape)
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean = torch.empty(groups, x.shape[1], dtype=stat_dtype, device=x.device)
        rstd = torch.empty_like(mean)
        update = training and running_mean is not None and running_var is not None
        bn_forward(x3, y3, weight, bias, mask, noise, noise_bias, running_mean, running_var, mean, rstd,
                   groups=groups, training=training, update_running=update, momentum=momentum, eps=eps, relu=relu,
                   residual3=r3)
        ctx.save_for_backward(x3, weight, bias, mask, noise, noise_bias, mean, rstd, r3)
        ctx.training, ctx.groups, ctx.shape, ctx.relu = training, groups, x.shape, relu
        ctx.residual_shape = None if residual is None else residual.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels.batch_norm import bn_backward

        x3, weight, bias, mask, noise, noise_bias, mean, rstd, r3 = ctx.saved_tensors
        dy3 = _ncs(dy)
        dx = torch.empty_like(x3) if ctx.needs_input_grad[0] else None
        dr = torch.empty_like(r3) if r3 is not None and ctx.needs_input_grad[13] else None
        dweight, dbias, dmask, dnoise, dnoise_b = _param_grad_buffers(ctx, weight, bias, mask, noise, noise_bias)
        bn_backward(x3, dy3, dx, weight, bias, mask, noise, noise_bias, mean, rstd, groups=ctx.groups,
                    training=ctx.training, dmask=dmask, dnoise=dnoise, dnoise_bias=dnoise_b, dweight=dweight,
                    dbias=dbias, relu=ctx.relu, residual3=r3, dresidual3=dr)
        if dx is not None:
            dx = dx.view(ctx.shape)
        if dr is not None:
            dr = dr.view(ctx.residual_shape)
        return dx, dweight, dbias, dmask, dnoise, dnoise_b, None, None, None, None, None, None, None, dr


# ---------------------------------------------------------------------------------------------
# Masked-and-perturbed LayerNorm
# ---------------------------------------------------------------------------------------------
def perturbed_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         mask: torch.Tensor, noise: torch.Tensor | None = None,
                         noise_bias: torch.Tensor | None = None, eps: float = 1e-5, groups: int = 1,
                         channel_dim: int = -1) -> torch.Tensor:
    """LayerNorm over the feature axis ``channel_dim`` whose scale is ``weight * (mask + noise[g])``
    and shift ``bias * (1 + noise_bias[g])``.

    ``channel_dim``: -1 for ``nn.LayerNorm((C,))`` on (N, ..., C) (ViT tokens, Swin's NHWC), or 1
    for the LayerNorm2d of ConvNeXt-style models on NCHW (contiguous or channels_last, neither
    copied). Statistics are per position, over the C features (biased variance); there are no
    running statistics. The batch (dim 0) is ``groups`` equal contiguous chunks, chunk g perturbed
    by row g of ``noise``/``noise_bias`` ((groups, C), (C,) for one group, or None; rows may be
    strided views into a flat arena). ``weight``/``bias`` None mean ones/zeros. Gradients flow to
    x, mask, noise, noise_bias, and to weight/bias only when they require grad. Statistics and
    reductions in float32 (float64 for float64); y is a new tensor in x's dtype and memory layout.
    """
    checks = _CHECKS.get()
    if checks:
        _check_layer_norm(x, channel_dim)
    axis = 1 if channel_dim == 1 and x.dim() > 2 else -1  # the features of NC... or of ...C
    if checks:
        _check_norm_params(x, x.shape[axis], "features", weight, bias, mask, noise, noise_bias, eps, groups)
    noise, noise_bias = _rows(noise, groups, x.shape[axis]), _rows(noise_bias, groups, x.shape[axis])
    if backend_for(x) == "triton" and x.numel() > 0:
        return _PerturbedLayerNorm.apply(x, weight, bias, mask, noise, noise_bias, eps, groups, axis)
    return _perturbed_layer_norm_torch(x, weight, bias, mask, noise, noise_bias, eps, groups, axis)


def _check_layer_norm(x, channel_dim) -> None:
    """Validate x and channel_dim (the feature axis: 1 for NC..., -1 or the last for ...C)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise InputError(f"x must be a tensor (N, ..., C) or (N, C, *spatial) with a batch axis, got "
                         f"{'shape ' + str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")
    _check_float("x", x)
    last = x.dim() - 1
    if isinstance(channel_dim, bool) or channel_dim not in (-1, last, 1):
        nchw = " or 1 (the channels of NCHW, ConvNeXt's LayerNorm2d)" if last > 1 else ""
        raise InputError(f"channel_dim must be -1 or {last} (the last axis, nn.LayerNorm((C,))){nchw}, "
                         f"got {channel_dim!r}")


def _check_norm_params(x, c, unit, weight, bias, mask, noise, noise_bias, eps, groups):
    """Validate the parameters of :func:`perturbed_layer_norm` / :func:`perturbed_group_norm` (C = ``c``
    ``unit``)."""
    for name, t in (("weight", weight), ("bias", bias), ("mask", mask), ("noise", noise), ("noise_bias", noise_bias)):
        if not isinstance(t, torch.Tensor) and (t is not None or name == "mask"):
            raise InputError(f"{name} must be a tensor{'' if name == 'mask' else ' or None'}, got {type(t).__name__}")
    _check_same_device(x=x, weight=weight, bias=bias, mask=mask, noise=noise, noise_bias=noise_bias)
    n = x.shape[0]
    _check_groups(n, groups)
    check_positive(eps, "eps")
    _check_vectors(c, unit, weight=weight, bias=bias, mask=mask)
    _check_rows(noise, "noise", groups, c)
    _check_rows(noise_bias, "noise_bias", groups, c)


def _perturbed_layer_norm_torch(x, weight, bias, mask, noise, noise_bias, eps, groups, axis):
    """F.layer_norm on the features moved last, each group with its own scale and shift (so that
    with mask 1 and no noise it is bitwise ``F.layer_norm(x, (C,), weight, bias, eps)``)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[axis]
    scale, shift = group_affine(weight, bias, mask, noise, noise_bias, groups, c)
    moved = x.movedim(axis, -1)
    outs = [F.layer_norm(part.to(compute), (c,), scale[g].to(compute), None if shift is None else shift[g].to(compute),
                         eps) for g, part in enumerate(moved.chunk(groups))]
    y = (outs[0] if groups == 1 else torch.cat(outs)).movedim(-1, axis)
    if y.stride() == x.stride():
        return y.to(x.dtype)
    return torch.empty_like(x).copy_(y)  # x's memory layout


def _nfs(t: torch.Tensor, axis: int) -> torch.Tensor | None:
    """A (N, C, S) view of ``t`` with C its feature axis ``axis`` (1 or -1) and S the positions
    merged: NC... as (N, C, H*W); (N, ..., C) as (N, T, C) transposed. None if the positions
    cannot be merged without a copy."""
    n, c = t.shape[0], t.shape[axis]
    try:
        return t.view(n, c, -1) if axis == 1 else t.view(n, -1, c).transpose(1, 2)
    except RuntimeError:
        return None


def _from_nfs(t3: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    """Undo :func:`_nfs`: the tensor of ``shape`` whose (N, C, S) view is ``t3``."""
    return t3.reshape(shape) if axis == 1 else t3.transpose(1, 2).reshape(shape)


class _PerturbedLayerNorm(torch.autograd.Function):
    """The Triton path: one fused forward kernel; one fused backward kernel plus a small one that
    reduces its per-program partial sums into the parameter gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, noise, noise_bias, eps, groups, axis):
        from .kernels.layer_norm import ln_forward

        x3 = _nfs(x, axis)
        if x3 is None:
            x3 = _nfs(x.contiguous(), axis)
        # y is allocated in x's memory format and returned itself, not a view of a buffer: the
        # caller may modify it in place. A layout whose positions do not merge gets a contiguous y.
        y = torch.empty_like(x)
        y3 = _nfs(y, axis)
        if y3 is None:
            y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            y3 = _nfs(y, axis)
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean = torch.empty(x3.shape[0] * x3.shape[2], dtype=stat_dtype, device=x.device)
        rstd = torch.empty_like(mean)
        ln_forward(x3, y3, weight, bias, mask, noise, noise_bias, mean, rstd, groups=groups, eps=eps)
        ctx.save_for_backward(x3, weight, bias, mask, noise, noise_bias, mean, rstd)
        ctx.groups, ctx.axis, ctx.shape = groups, axis, x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from .kernels.layer_norm import ln_backward

        x3, weight, bias, mask, noise, noise_bias, mean, rstd = ctx.saved_tensors
        dy3 = _nfs(dy, ctx.axis)
        if dy3 is None:
            dy3 = _nfs(dy.contiguous(), ctx.axis)
        dx3 = torch.empty_like(x3) if ctx.needs_input_grad[0] else None  # x's layout (x3's strides when it is dense)
        dweight, dbias, dmask, dnoise, dnoise_b = _param_grad_buffers(ctx, weight, bias, mask, noise, noise_bias)
        ln_backward(x3, dy3, dx3, weight, bias, mask, noise, noise_bias, mean, rstd, groups=ctx.groups,
                    dmask=dmask, dnoise=dnoise, dnoise_bias=dnoise_b, dweight=dweight, dbias=dbias)
        dx = _from_nfs(dx3, ctx.shape, ctx.axis) if dx3 is not None else None
        return dx, dweight, dbias, dmask, dnoise, dnoise_b, None, None, None


# ---------------------------------------------------------------------------------------------
# Masked-and-perturbed GroupNorm
# ---------------------------------------------------------------------------------------------
def perturbed_group_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         mask: torch.Tensor, noise: torch.Tensor | None = None,
                         noise_bias: torch.Tensor | None = None, num_groups: int = 1, eps: float = 1e-5,
                         groups: int = 1) -> torch.Tensor:
    """GroupNorm with ``num_groups`` channel groups whose per-channel scale is
    ``weight * (mask + noise[g])`` and shift ``bias * (1 + noise_bias[g])``.

    ``x`` is (N, C) or (N, C, *spatial), contiguous or channels_last (neither copied); C must be
    divisible by ``num_groups``. Each sample is normalised over each group of C / num_groups
    channels and all positions (biased variance, eps inside the square root); there are no
    running statistics. The batch (dim 0) is ``groups`` equal contiguous chunks (batch groups,
    e.g. clean and perturbed), chunk g perturbed by row g of ``noise``/``noise_bias`` ((groups, C),
    (C,) for one group, or None; rows may be strided views into a flat arena): statistics are per
    sample, so batch groups only pick the affine. ``weight``/``bias`` None mean ones/zeros.
    Gradients flow to x, mask, noise, noise_bias, and to weight/bias only when they require grad.
    Statistics and reductions in float32 (float64 for float64); y is a new tensor in x's dtype
    and memory layout. With mask 1 and no noise, float32/float64 inputs on the PyTorch path give
    exactly ``F.group_norm(x, num_groups, weight, bias, eps)``.
    """
    if _CHECKS.get():
        _check_group_norm(x, weight, bias, mask, noise, noise_bias, num_groups, eps, groups)
    noise, noise_bias = _rows(noise, groups, x.shape[1]), _rows(noise_bias, groups, x.shape[1])
    if backend_for(x) == "triton" and x.numel() > 0:
        return _PerturbedGroupNorm.apply(x, weight, bias, mask, noise, noise_bias, num_groups, eps, groups)
    return _perturbed_group_norm_torch(x, weight, bias, mask, noise, noise_bias, num_groups, eps, groups)


def _check_group_norm(x, weight, bias, mask, noise, noise_bias, num_groups, eps, groups):
    """Validate the arguments of :func:`perturbed_group_norm`."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise InputError(f"x must be a tensor (N, C) or (N, C, *spatial), got "
                         f"{'shape ' + str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")
    _check_float("x", x)
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise InputError(f"num_groups must be a positive integer dividing the {c} channels of x (dim 1), "
                         f"got {num_groups!r}")
    _check_norm_params(x, c, "channels", weight, bias, mask, noise, noise_bias, eps, groups)


def _perturbed_group_norm_torch(x, weight, bias, mask, noise, noise_bias, num_groups, eps, groups):
    """Per batch chunk, ``F.group_norm`` with the chunk's scale and shift folded into its affine:
    with mask 1 and no noise this is F.group_norm itself, bit for bit (float32/float64), on x's
    NCHW-contiguous copy: PyTorch's CPU GroupNorm backward on channels_last crashes (a
    segmentation fault, torch 2.13) whenever the input's gradient is not asked for, as in ANP's
    first norm layer; the output comes back in x's layout."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale, shift = group_affine(weight, bias, mask, noise, noise_bias, groups, x.shape[1])
    outs = []
    for g, xg in enumerate(x.contiguous().chunk(groups)):
        y = F.group_norm(xg.to(compute), num_groups, scale[g].to(compute),
                         None if shift is None else shift[g].to(compute), eps)
        outs.append(y.to(x.dtype))
    y = outs[0] if groups == 1 else torch.cat(outs)
    if y.stride() == x.stride() and y is not x:
        return y
    return torch.empty_like(x).copy_(y)  # x's memory layout


class _PerturbedGroupNorm(torch.autograd.Function):
    """The Triton path: a statistics kernel and a normalising kernel forward; a kernel of
    per-sample, per-channel sums, one that sums them per batch group (only for parameter
    gradients) and one that writes dx and the parameter gradients, backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, noise, noise_bias, num_groups, eps, groups):
        from .kernels.group_norm import gn_forward

        x3 = _ncs(x)
        # y is allocated in x's memory format (dense) and returned itself, not a view of a buffer:
        # the caller may modify it in place (e.g. an inplace activation).
        # A layout whose positions do not merge into one axis gets a contiguous y.
        y = torch.empty_like(x)
        try:
            y3 = y.view(x3.shape)
        except RuntimeError:
            y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            y3 = y.view(x3.shape)
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean = torch.empty(x.shape[0] * num_groups, dtype=stat_dtype, device=x.device)
        rstd = torch.empty_like(mean)
        gn_forward(x3, y3, weight, bias, mask, noise, noise_bias, mean, rstd, num_groups=num_groups, groups=groups,
                   eps=eps)
        ctx.save_for_backward(x3, weight, bias, mask, noise, noise_bias, mean, rstd)
        ctx.num_groups, ctx.groups, ctx.shape = num_groups, groups, x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from .kernels.group_norm import gn_backward

        x3, weight, bias, mask, noise, noise_bias, mean, rstd = ctx.saved_tensors
        dy3 = _ncs(dy)
        dx3 = torch.empty_like(x3) if ctx.needs_input_grad[0] else None  # x's layout (x3 is dense)
        dweight, dbias, dmask, dnoise, dnoise_b = _param_grad_buffers(ctx, weight, bias, mask, noise, noise_bias)
        gn_backward(x3, dy3, dx3, weight, bias, mask, noise, noise_bias, mean, rstd, num_groups=ctx.num_groups,
                    groups=ctx.groups, dmask=dmask, dnoise=dnoise, dnoise_bias=dnoise_b, dweight=dweight,
                    dbias=dbias)
        dx = dx3.view(ctx.shape) if dx3 is not None else None
        return dx, dweight, dbias, dmask, dnoise, dnoise_b, None, None, None


# ---------------------------------------------------------------------------------------------
# Flat-buffer updates (ANP)
# ---------------------------------------------------------------------------------------------
def _check_flat_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    _check_same_device(**{names[0]: a, names[1]: b})
    _check_float(names[0], a)
    _check_float(names[1], b)
    if a.shape != b.shape:
        raise InputError(f"{names[0]} and {names[1]} must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not a.is_contiguous():
        raise InputError(f"{names[0]} is updated in place and must be contiguous (a flat buffer or a view of one)")


@torch.no_grad()
def noise_sign_step_(noise: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float,
                     clamp: bool = True) -> torch.Tensor:
    """In place: ``noise <- noise + step_size * sign(grad)``, then clamped to [-eps, eps] if
    ``clamp`` (the gradient is that of the loss being ascended). Returns ``noise``."""
    _check_flat_pair(noise, grad, ("noise", "grad"))
    if backend_for(noise) == "triton":
        from .kernels.updates import noise_sign_step

        noise_sign_step(noise, grad.contiguous(), step_size, eps, clamp)
        return noise
    noise.add_(torch.sign(grad), alpha=step_size)
    return noise.clamp_(-eps, eps) if clamp else noise


@torch.no_grad()
def mask_sgd_step_(mask: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor, lr: float,
                   momentum: float) -> torch.Tensor:
    """In place, torch SGD semantics: ``buf <- momentum * buf + grad; mask <- mask - lr * buf``,
    then the mask is clamped to [0, 1]. Returns ``mask``."""
    _check_flat_pair(mask, grad, ("mask", "grad"))
    _check_flat_pair(momentum_buffer, mask, ("momentum_buffer", "mask"))
    if backend_for(mask) == "triton":
        from .kernels.updates import mask_sgd_step

        mask_sgd_step(mask, grad.contiguous(), momentum_buffer, lr, momentum)
        return mask
    momentum_buffer.mul_(momentum).add_(grad)
    return mask.sub_(momentum_buffer, alpha=lr).clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# PGD
# ---------------------------------------------------------------------------------------------
def _check_pgd(x_adv: torch.Tensor, x0: torch.Tensor, eps: float, lo: float, hi: float) -> None:
    _check_flat_pair(x_adv, x0, ("x_adv", "x0"))
    if not eps >= 0:
        raise InputError(f"eps must be >= 0, got {eps!r}")
    if not lo < hi:
        raise InputError(f"the pixel range needs lo < hi, got lo={lo!r}, hi={hi!r}")


@torch.no_grad()
def pgd_step_(x_adv: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, alpha: float, eps: float,
              lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """In place, L-infinity: ``x_adv <- clamp(x_adv + alpha * sign(grad), max(x0 - eps, lo),
    min(x0 + eps, hi))`` (one clamp to the intersection of the eps-ball and the pixel range)."""
    _check_pgd(x_adv, x0, eps, lo, hi)
    _check_flat_pair(x_adv, grad, ("x_adv", "grad"))
    if backend_for(x_adv) == "triton":
        from .kernels.pgd import pgd_linf_step

        pgd_linf_step(x_adv, x0.contiguous(), grad.contiguous(), alpha, eps, lo, hi)
        return x_adv
    x_adv.add_(torch.sign(grad), alpha=alpha)
    low, high = (x0 - eps).clamp_(min=lo), (x0 + eps).clamp_(max=hi)
    return torch.min(torch.max(x_adv, low), high, out=x_adv)


@torch.no_grad()
def pgd_l2_step_(x_adv: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, alpha: float, eps: float,
                 lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """In place, L2, per image (row of the batch): ``x' = x_adv + alpha * grad / (||grad|| + 1e-10)``,
    then ``x_adv <- clamp(x0 + (x' - x0) * min(1, eps / ||x' - x0||), lo, hi)`` (torchattacks'
    ``PGDL2`` step). Norms in float32 (float64 for float64)."""
    _check_pgd(x_adv, x0, eps, lo, hi)
    _check_flat_pair(x_adv, grad, ("x_adv", "grad"))
    if x_adv.dim() < 2:
        raise InputError(f"the L2 step needs a batch, shape (N, ...) with one image per row; got {tuple(x_adv.shape)}")
    if backend_for(x_adv) == "triton" and x_adv.is_contiguous():
        from .kernels.pgd import pgd_l2_step

        pgd_l2_step(x_adv, x0.contiguous(), grad.contiguous(), alpha, eps, lo, hi)
        return x_adv
    acc = torch.float64 if x_adv.dtype == torch.float64 else torch.float32
    shape = (-1,) + (1,) * (x_adv.dim() - 1)
    g = grad.to(acc)
    moved = x_adv.to(acc) + alpha * g / (g.flatten(1).norm(dim=1).view(shape) + 1e-10)
    delta = moved - x0.to(acc)
    delta = delta * torch.clamp(eps / delta.flatten(1).norm(dim=1).view(shape), max=1.0)
    return x_adv.copy_((x0.to(acc) + delta).clamp_(lo, hi))


@torch.no_grad()
def pgd_random_start(x0: torch.Tensor, eps: float, lo: float = 0.0, hi: float = 1.0,
                     generator: torch.Generator | None = None, norm: str = "linf") -> torch.Tensor:
    """A random start in the eps-ball around ``x0``, drawn on x0's device (a seeded generator
    reproduces it). L-inf: ``clamp(x0 + eps * (2u - 1), lo, hi)`` with ``u = torch.rand(x0.shape)``.
    L2 (a batch, one image per row): a Gaussian direction ``z = torch.randn(x0.shape)`` and a
    radius ``r = torch.rand(N) * eps`` per image, ``clamp(x0 + z / ||z|| * r, lo, hi)`` (the draws of
    torchattacks' ``PGDL2``, in that order)."""
    x0 = x0.contiguous()
    x_adv = torch.empty_like(x0)
    _check_pgd(x_adv, x0, eps, lo, hi)
    if norm == "l2":
        if x0.dim() < 2:
            raise InputError(f"the L2 start needs a batch, shape (N, ...) with one image per row; "
                             f"got {tuple(x0.shape)}")
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        norms = z.flatten(1).norm(dim=1).view(shape)
        radius = torch.rand(norms.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return torch.clamp(x0 + z * radius / norms * eps, lo, hi, out=x_adv)
    if norm != "linf":
        raise InputError(f"norm must be 'linf' or 'l2', got {norm!r}")
    u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if backend_for(x0) == "triton":
        from .kernels.pgd import pgd_random_start as launch

        launch(x_adv, x0, u, eps, lo, hi)
        return x_adv
    return torch.clamp(x0 + eps * (2 * u - 1), lo, hi, out=x_adv)


# ---------------------------------------------------------------------------------------------
# PBE scoring
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def logits_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise cosine similarity (N,) of two (N, K) logit matrices:
    ``a.b / max(|a| |b|, eps)``, computed in float32 (float64 for float64)."""
    _check_same_device(a=a, b=b)
    _check_float("a", a)
    _check_float("b", b)
    if a.dim() != 2 or a.shape != b.shape:
        raise InputError(f"logits must be two (N, K) matrices of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    out_dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    if backend_for(a) == "triton":
        from .kernels.cosine import row_cosine

        out = torch.empty(a.shape[0], dtype=out_dtype, device=a.device)
        row_cosine(a.to(out_dtype), b.to(out_dtype), out, eps)
        return out
    a, b = a.to(out_dtype), b.to(out_dtype)
    norms = a.norm(dim=1) * b.norm(dim=1)
    return (a * b).sum(1) / norms.clamp_min(eps)


# ---------------------------------------------------------------------------------------------
# Masked-and-perturbed Conv/Linear outputs (the paper's Eq. 3)
# ---------------------------------------------------------------------------------------------
def perturbed_channel_affine(y: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                             noise: torch.Tensor | None = None, noise_bias: torch.Tensor | None = None,
                             groups: int = 1, channel_dim: int = 1) -> torch.Tensor:
    """The output of a Conv/Linear layer whose output channel k has weight ``W_k * (m_k + delta_k)``
    and bias ``b_k * (1 + xi_k)``, from its bias-free output ``y = W * x``: since the layer is
    linear in ``W_k``, ``y_k * (m_k + delta_k[g]) + b_k * (1 + xi_k[g])``.

    ``channel_dim``: 1 (convolutions, NC...) or -1 (Linear, ...C). The batch (dim 0) is
    ``groups`` equal contiguous chunks, chunk g perturbed by row g of ``noise``/``noise_bias``
    ((groups, C), (C,) for one group, or None). Plain PyTorch ops: the convolution or matmul
    dominates, and autograd fuses nothing worth a kernel here."""
    if _CHECKS.get():
        _check_channel_affine(y, bias, mask, noise, noise_bias, groups, channel_dim)
    n, c = y.shape[0], y.shape[channel_dim]
    noise, noise_bias = _rows(noise, groups, c), _rows(noise_bias, groups, c)
    scale, shift = group_affine(None, bias, mask, noise, noise_bias, groups, c)
    # (groups, C) -> broadcastable against y viewed as (groups, N / groups, ...)
    view = (groups, 1, c) + (1,) * (y.dim() - 2) if channel_dim == 1 else (groups,) + (1,) * (y.dim() - 1) + (c,)
    yg = y.reshape(groups, n // groups, *y.shape[1:])
    out = yg * scale.view(view).to(y.dtype)
    if shift is not None:
        out = out + shift.view(view).to(y.dtype)
    return out.reshape(y.shape)


def _check_channel_affine(y, bias, mask, noise, noise_bias, groups, channel_dim) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() < 2:
        raise InputError(f"y must be a layer output (N, C, ...) or (N, ..., C), got shape "
                         f"{tuple(getattr(y, 'shape', ()))}")
    _check_float("y", y)
    if channel_dim not in (1, -1):
        raise InputError(f"channel_dim must be 1 (convolutions) or -1 (Linear), got {channel_dim!r}")
    _check_same_device(y=y, bias=bias, mask=mask, noise=noise, noise_bias=noise_bias)
    c = y.shape[channel_dim]
    _check_groups(y.shape[0], groups)
    _check_vectors(c, "output channels", bias=bias, mask=mask)
    _check_rows(noise, "noise", groups, c)
    _check_rows(noise_bias, "noise_bias", groups, c)
