"""Device-resident batches with the ANP augmentation, drawn from a ``torch.Generator``.

The reference and the fast engines both draw through this one module, so that with the same
seed they see the same batches, crops and flips, draw for draw. Everything stays on the
tensors' device: no DataLoader, no per-image PIL transforms.

Order of the random draws for one batch (the contract the engines rely on):
  1. indices  ``torch.randint(N, (B,))``   (with replacement) or a slice of an epoch permutation
  2. offsets  ``torch.randint(0, 2*padding + 1, (B, 2))``  (row, column) of the crop window
  3. flips    ``torch.rand(B) < 0.5``
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..validation import InputError, check_images, check_labels, check_positive_int


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def augment_batch(images: torch.Tensor, generator: torch.Generator, padding: int = 4,
                  flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding by ``padding`` pixels, then a random horizontal flip.

    Same semantics as torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()``
    applied image by image, but done for the whole batch at once on its device.
    """
    offsets, flip_u = draw_augmentation(images.shape[0], generator, padding, flip, images.device)
    return apply_augmentation(images, offsets, flip_u, padding)


def draw_augmentation(n: int, generator: torch.Generator, padding: int, flip: bool,
                      device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The augmentation's random draws for ``n`` images, in the module's order: the crop
    offsets (n, 2) (None without padding), then one uniform per image for the flip (None without
    flips; an image is flipped where its draw is < 0.5)."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device) if padding > 0 else None
    flip_u = torch.rand(n, generator=generator, device=device) if flip else None
    return offsets, flip_u


def apply_augmentation(images: torch.Tensor, offsets: torch.Tensor | None, flip_u: torch.Tensor | None,
                       padding: int) -> torch.Tensor:
    """The crop (``offsets``, after zero padding by ``padding``) and the flip (``flip_u < 0.5``) of
    :func:`draw_augmentation`'s draws, applied to the batch."""
    n, _, h, w = images.shape
    dev = images.device
    out = images
    if offsets is not None:
        padded = F.pad(images, (padding, padding, padding, padding))
        rows = offsets[:, 0, None] + torch.arange(h, device=dev)  # (N, H)
        cols = offsets[:, 1, None] + torch.arange(w, device=dev)  # (N, W)
        batch = torch.arange(n, device=dev)[:, None, None]
        # Advanced indexing on axes 0, 2, 3 puts the channel axis last: (N, H, W, C).
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip_u is not None:
        flips = flip_u < 0.5
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    # A fresh NCHW tensor with the default strides (a 1-channel result of the indexing above
    # would keep NHWC strides, which changes the convolution algorithm the next layer picks).
    return out.clone(memory_format=torch.contiguous_format)


class DeviceBatchSampler:
    """Batches of (images, labels) held on one device, with optional ANP augmentation.

    ``sample()`` draws one batch with replacement (as ANP's ``RandomSampler(replacement=True)``);
    iterating gives one epoch of a fresh permutation (as a shuffled DataLoader), the last
    partial batch kept unless ``drop_last``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 generator: torch.Generator | None = None, seed: int = 0, augment: bool = True,
                 padding: int = 4, flip: bool = True, drop_last: bool = False,
                 device: torch.device | str | None = None):
        check_images(images)
        check_labels(labels, num_images=images.shape[0])
        check_positive_int(batch_size, "batch_size")
        if not isinstance(padding, int) or padding < 0:
            raise InputError(f"padding must be a non-negative integer, got {padding!r}")
        device = torch.device(device) if device is not None else images.device
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.augment, self.padding, self.flip, self.drop_last = augment, padding, flip, drop_last
        if generator is None:
            generator = make_generator(seed, device)
        elif generator.device.type != device.type:
            raise InputError(f"the generator is on {generator.device} but the data is on {device}; "
                             "they must share a device type")
        self.generator = generator

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.images[index], self.labels[index]
        if self.augment:
            x = augment_batch(x, self.generator, self.padding, self.flip)
        return x, y

    def sample_into(self, images: torch.Tensor, labels: torch.Tensor, rows: slice = slice(None)) -> None:
        """:meth:`sample`'s batch (the same draws, the same values), rows ``rows`` of it written into
        ``images`` and ``labels`` (an engine's batch buffers: any strides, any float dtype). Where the
        Triton kernels run (CUDA, or the interpreter) the gather, crop, flip and writes are one
        launch after the draws (``kernels/augment.py``); elsewhere :meth:`sample` and a copy."""
        n = self.batch_size
        if images.shape[0] != len(range(n)[rows]) or images.shape[1:] != self.images.shape[1:]:
            raise InputError(f"the batch buffer holds {tuple(images.shape)}, but rows {rows} of a batch of "
                             f"{(n, *self.images.shape[1:])} were asked for")
        from ..functional import backend_for  # the data layer's one fused operation: lazily, as the kernels

        if images.dim() != 4 or images.device != self.device or backend_for(images) != "triton":
            x, y = self.sample()
            images.copy_(x[rows])
            labels.copy_(y[rows])
            return
        from ..kernels.augment import gather_augment

        index = self._draw_index()
        offsets, flip_u = (draw_augmentation(n, self.generator, self.padding, self.flip, self.device) if self.augment
                           else (None, None))
        gather_augment(self.images, self.labels, index[rows], None if offsets is None else offsets[rows],
                       None if flip_u is None else flip_u[rows], self.padding, images, labels)

    def _draw_index(self) -> torch.Tensor:
        """The batch's indices, drawn uniformly with replacement (the first draw of a batch)."""
        return torch.randint(self.images.shape[0], (self.batch_size,), generator=self.generator, device=self.device)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of ``batch_size`` drawn uniformly with replacement."""
        return self._take(self._draw_index())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.images.shape[0]
        perm = torch.randperm(n, generator=self.generator, device=self.device)
        for start in range(0, n, self.batch_size):
            index = perm[start:start + self.batch_size]
            if self.drop_last and index.shape[0] < self.batch_size:
                break
            yield self._take(index)
