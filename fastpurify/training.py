"""Train a classifier on device-resident tensors: SGD with momentum, a cosine or one-cycle
learning rate, optionally bf16 autocast and channels_last (the fast GPU recipe).

Used to make the test subjects (backdoored models) and reusable by any later fine-tuning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DeviceBatchSampler
from .inference import model_device
from .validation import InputError, check_labels, check_positive, check_positive_int

SCHEDULES = ("cosine", "onecycle")


@dataclass
class TrainHistory:
    """Per-epoch mean training loss and accuracy (on the augmented batches), the wall time and
    how the training ran (``settings``)."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)


def learning_rate_schedule(opt: torch.optim.Optimizer, schedule: str, lr: float,
                           total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``cosine``: from ``lr`` down to 0 over all steps. ``onecycle``: a linear warm-up from
    ``lr / 25`` to ``lr`` over the first 25 % of the steps, then linearly down to ``lr / 2500``
    (momentum cycled 0.95 -> 0.85 -> 0.95), the fast CIFAR recipe."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.25,
                                               anneal_strategy="linear")


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 30,
                     lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
                     augment: bool = True, padding: int = 4, flip: bool = True, seed: int = 0,
                     device: torch.device | str | None = None, progress: bool = True, schedule: str = "cosine",
                     nesterov: bool = False, label_smoothing: float = 0.0, precision: str = "fp32",
                     channels_last: bool | None = False, tf32: bool = True) -> TrainHistory:
    """Train ``model`` in place with cross-entropy for ``epochs`` passes over the data.

    The data is moved once to ``device`` (default: the model's) and batched there by
    :class:`DeviceBatchSampler` with the ANP augmentation (crop and flip of the whole batch at
    once); the learning rate follows ``schedule`` (:func:`learning_rate_schedule`) over all
    steps. Speed options: ``precision="bf16"`` (autocast; loss and weights stay float32),
    ``channels_last`` (None: on CUDA) and ``tf32`` (CUDA convolutions and matmuls). The model
    comes back in its original memory format.
    """
    # Imported here: the engines' package imports the backdoor subjects, which import this module.
    from .engines.runtime import check_precision, logits_in, tf32_enabled, to_memory_format, use_channels_last

    check_positive_int(epochs, "epochs")
    check_positive(lr, "lr")
    check_precision(precision)
    if schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise InputError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    num_classes = _output_classes(model)
    check_labels(labels, num_images=images.shape[0], num_classes=num_classes)
    sampler = DeviceBatchSampler(images, labels, batch_size, seed=seed, augment=augment, padding=padding,
                                 flip=flip, device=device)
    channels_last = use_channels_last(channels_last, device, sampler.images, cpu=False)  # None: CUDA only here
    to_memory_format(model, channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov)
    sched = learning_rate_schedule(opt, schedule, lr, epochs * len(sampler))
    history = TrainHistory(settings=dict(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                         batch_size=batch_size, augment=augment, padding=padding, flip=flip,
                                         seed=seed, schedule=schedule, nesterov=nesterov,
                                         label_smoothing=label_smoothing, precision=precision,
                                         channels_last=channels_last, device=str(device)))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, desc="training", unit="epoch")
    start = time.perf_counter()
    model.train()
    try:
        with tf32_enabled(tf32 and device.type == "cuda"):
            for _ in range(epochs):
                total_loss = torch.zeros((), device=device)
                correct = torch.zeros((), device=device, dtype=torch.int64)
                for x, y in sampler:
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    logits = logits_in(model, x, device, precision)
                    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total_loss += loss.detach() * y.shape[0]
                    correct += (logits.detach().argmax(1) == y).sum()
                n = sampler.images.shape[0]
                history.loss.append(float(total_loss) / n)
                history.accuracy.append(float(correct) / n)
                if bar is not None:
                    bar.set_postfix(loss=f"{history.loss[-1]:.3f}", acc=f"{history.accuracy[-1]:.3f}")
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    history.seconds = time.perf_counter() - start
    return history


def _output_classes(model: nn.Module) -> int | None:
    """The number of classes of the model's last Linear layer, when it has one."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None
