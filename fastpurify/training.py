"""Train a classifier on device-resident tensors: SGD with momentum, cosine learning rate.

Used to make the test subjects (backdoored models) and reusable by any later fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DeviceBatchSampler
from .inference import model_device
from .validation import check_labels, check_positive, check_positive_int


@dataclass
class TrainHistory:
    """Per-epoch mean training loss and accuracy (on the augmented batches)."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 30,
                     lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
                     augment: bool = True, padding: int = 4, flip: bool = True, seed: int = 0,
                     device: torch.device | str | None = None, progress: bool = True) -> TrainHistory:
    """Train ``model`` in place with cross-entropy for ``epochs`` passes over the data.

    The data is moved once to ``device`` (default: the model's) and batched there by
    :class:`DeviceBatchSampler` with the ANP augmentation; the learning rate follows a cosine
    schedule from ``lr`` to 0 over all steps.
    """
    import time

    check_positive_int(epochs, "epochs")
    check_positive(lr, "lr")
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    num_classes = _output_classes(model)
    check_labels(labels, num_images=images.shape[0], num_classes=num_classes)
    sampler = DeviceBatchSampler(images, labels, batch_size, seed=seed, augment=augment, padding=padding,
                                 flip=flip, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(sampler))
    history = TrainHistory()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, desc="training", unit="epoch")
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        total_loss = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        for x, y in sampler:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.detach() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
        n = sampler.images.shape[0]
        history.loss.append(float(total_loss) / n)
        history.accuracy.append(float(correct) / n)
        if bar is not None:
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", acc=f"{history.accuracy[-1]:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    history.seconds = time.perf_counter() - start
    return history


def _output_classes(model: nn.Module) -> int | None:
    """The number of classes of the model's last Linear layer, when it has one."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None
