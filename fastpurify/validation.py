"""Input checks shared by every entry point.

Each check raises :class:`InputError` (a ``ValueError``) whose message says what was wrong
and what is accepted, so that a bad call fails at the door rather than deep in a kernel.
"""

from __future__ import annotations

import math
import warnings

import torch

PGD_NORMS = ("linf", "l2")


class InputError(ValueError):
    """Raised for user input that fastpurify cannot accept."""


def check_images(images: torch.Tensor, name: str = "images", unit_range: bool = False) -> None:
    """Images must be a non-empty floating tensor (N, C, H, W) of finite values.

    With ``unit_range`` the pixels must also lie in [0, 1] (what the attacks and PGD assume).
    """
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise InputError(
            f"{name} must have rank 4, (N, C, H, W), got rank {images.dim()} with shape {tuple(images.shape)}; "
            "add a channel axis for grayscale images (images.unsqueeze(1))"
        )
    if images.shape[0] == 0:
        raise InputError(f"{name} is empty: no images were given")
    if min(images.shape[1:]) == 0:
        raise InputError(f"{name} has an empty channel or spatial axis: shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputError(f"{name} must be floating point in [0, 1], got dtype {images.dtype}")
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputError(f"{name} holds {bad} NaN or Inf pixel value(s); every pixel must be finite")
    if unit_range:
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"{name} must hold pixel values in [0, 1], found [{lo:.4g}, {hi:.4g}]; un-normalise the "
                "images (put any mean/std normalisation inside the model)"
            )


def check_labels(labels: torch.Tensor, num_images: int | None = None, num_classes: int | None = None,
                 name: str = "labels") -> None:
    """Labels must be a 1-D integer tensor in [0, num_classes), one per image."""
    if not isinstance(labels, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise InputError(f"{name} must be 1-D (one class index per image), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if num_images is not None and labels.shape[0] != num_images:
        raise InputError(f"got {num_images} images but {labels.shape[0]} {name}; there must be one label per image")
    if labels.numel() == 0:
        raise InputError(f"{name} is empty: no labels were given")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise InputError(f"{name} must be class indices >= 0, found {lo}")
    if num_classes is not None and hi >= num_classes:
        raise InputError(f"{name} must lie in [0, {num_classes - 1}] for {num_classes} classes, found {hi}")


def check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def check_target(target: int, num_classes: int) -> None:
    """An attack's target class must be one of the model's classes."""
    if not isinstance(target, int) or isinstance(target, bool):
        raise InputError(f"target must be an integer class index, got {target!r}")
    if not 0 <= target < num_classes:
        raise InputError(f"target {target} is outside the classes: it must lie in [0, {num_classes - 1}]")


def check_fraction(value: float, name: str, *, low_open: bool = True, high_open: bool = True) -> None:
    """A rate such as a poison rate must lie in the (by default open) interval (0, 1)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        above = value > 0 if low_open else value >= 0
        below = value < 1 if high_open else value <= 1
        ok = above and below
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise InputError(f"{name} must lie in {interval}, got {value!r}")


def check_auto_or_fraction(value: float | str, name: str, what: str = "a number") -> None:
    """A setting read from the model unless given: "auto" or a number in (0, 1]."""
    if isinstance(value, str):
        if value != "auto":
            raise InputError(f"{name} must be {what} in (0, 1] or 'auto', got {value!r}")
        return
    check_fraction(value, name, high_open=False)


def check_anp_eps(eps: float | str, name: str) -> None:
    """ANP's neuron bound as a user gives it: "auto" (:mod:`fastpurify.anp_eps`) or a number in (0, 1]."""
    check_auto_or_fraction(eps, name)


MAX_HOLD = 10  # the auto rule's look-ahead, in candidates (selection.choose_pruning's hold)


def check_hold(value: int, name: str) -> None:
    """The auto rule's ``hold``: how many candidates after its stop must keep the share under the bar."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_HOLD:
        raise InputError(f"{name} must be a whole number of candidates from 0 to {MAX_HOLD} (0: the first share under "
                         f"the bar stops the walk), got {value!r}")


def check_positive_int(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def check_positive(value: float, name: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise InputError(f"{name} must be a positive finite number, got {value!r}")


def check_anp_settings(*, eps: float | str, steps: int, alpha: float, lr: float, momentum: float, iterations: int,
                       batch_size: int, auto_eps: bool = False) -> None:
    """ANP's hyper-parameters, checked before any work (the reference and the fast engine; with
    ``auto_eps``, eps may be "auto": :mod:`fastpurify.anp_eps`)."""
    if auto_eps and isinstance(eps, str):
        if eps != "auto":
            raise InputError(f"eps (the noise bound) must be a positive number or 'auto', got {eps!r}")
    else:
        check_positive(eps, "eps (the noise bound)")
    check_positive_int(steps, "steps (noise steps per iteration)")
    check_fraction(alpha, "alpha (the clean-loss weight)", low_open=False, high_open=False)
    check_positive(lr, "lr (the mask learning rate)")
    check_fraction(momentum, "momentum", low_open=False, high_open=True)
    check_positive_int(iterations, "iterations")
    check_positive_int(batch_size, "batch_size")


def check_pgd_settings(*, eps: float, alpha: float, steps: int, norm: str, lo: float, hi: float,
                       random_start: bool = True) -> None:
    """PGD's settings, checked before any work (the reference and the fast engine). An L-inf
    step larger than the ball (``alpha > eps``) without a random start is allowed but warned:
    the first step then lands on a corner of the ball and later steps can only flip signs."""
    check_positive(eps, "eps (the perturbation bound)")
    check_positive(alpha, "alpha (the step size)")
    check_positive_int(steps, "steps")
    if norm not in PGD_NORMS:
        raise InputError(f"norm must be one of {PGD_NORMS}, got {norm!r}")
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and math.isfinite(lo)
            and math.isfinite(hi) and lo < hi):
        raise InputError(f"the pixel range must be finite numbers lo < hi, got lo={lo!r}, hi={hi!r}")
    if norm == "linf" and alpha > eps and not random_start:
        warnings.warn(f"alpha={alpha:.4g} > eps={eps:.4g} for L-inf PGD without a random start: the first step lands "
                      "on a corner of the eps-ball and later steps can only flip signs (the usual choice is "
                      "alpha <= eps / 4)", UserWarning, stacklevel=3)
