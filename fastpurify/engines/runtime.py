"""What every fast engine does around its loop: pick the device, set TF32 and bf16 autocast,
put a model into channels_last, and capture a step in a CUDA graph (or say why not)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from ..validation import InputError

PRECISIONS = ("fp32", "bf16")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None``: the first CUDA device when there is one, else the CPU. The engines work on a
    copy of the model on this device, so the caller's model stays where it is."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for but CUDA is not available here; use device='cpu'")
    return device


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS} ('bf16' runs the forward passes under bfloat16 "
                         f"autocast), got {precision!r}")


@contextlib.contextmanager
def tf32_enabled(enabled: bool) -> Iterator[None]:
    """TF32 for cuDNN convolutions and matmuls while the block runs; the previous flags come back after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision="bf16"`` (cache off, so it can be captured), else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def logits_in(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """The model's logits on ``x``, the forward pass under :func:`autocast`; bfloat16 logits come
    back as float32, so losses and scores are never taken in bfloat16."""
    with autocast(device, precision):
        logits = model(x)
    return logits.float() if logits.dtype == torch.bfloat16 else logits


CPU_CHANNELS_LAST_DTYPES = (torch.float32, torch.bfloat16)  # oneDNN's convolution dtypes on the CPU


def channels_last_default(device: torch.device, dtype: torch.dtype, cpu: bool = True) -> bool:
    """The engines' default layout for image batches: channels_last on CUDA, and (``cpu``) on the
    CPU when the model computes in float32 or bfloat16, where oneDNN's convolutions, pooling and
    BatchNorm are faster in it (bench/NOTES.md, 2026-11-27). float64 stays NCHW on the CPU: oneDNN
    does not compute in it, channels_last is no faster there, and the float64 engines stay
    bit-for-bit equal to the reference. The trainer passes ``cpu=False`` (its subjects stay as
    cached)."""
    return device.type == "cuda" or (cpu and device.type == "cpu" and dtype in CPU_CHANNELS_LAST_DTYPES)


def use_channels_last(requested: bool | None, device: torch.device, sample: torch.Tensor,
                      dtype: torch.dtype | None = None, cpu: bool = True) -> bool:
    """Whether an engine runs its image batches (like ``sample``) in channels_last: only 4-D
    batches; ``requested`` None: :func:`channels_last_default` for ``dtype`` (default the
    sample's) and ``cpu``."""
    if sample.dim() != 4:
        return False
    if requested is not None:
        return bool(requested)
    return channels_last_default(device, sample.dtype if dtype is None else dtype, cpu)


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if channels_last else model


class GraphedStep:
    """A step (no arguments, reads and writes only static tensors) captured in a CUDA graph.

    Before capture the step runs ``warmup`` times on a side stream (as CUDA graphs require);
    the tensors in ``state`` are saved before and restored after, so warm-up and the self-check
    leave no trace. The self-check replays the graph once and runs the step eagerly once from
    the same state and compares ``check`` tensors; a mismatch (or any failure to capture)
    makes :meth:`try_capture` return None with a warning, and the engine runs eagerly.
    """

    def __init__(self, graph: torch.cuda.CUDAGraph):
        self.graph = graph

    def __call__(self) -> None:
        self.graph.replay()

    @classmethod
    def try_capture(cls, step: Callable[[], None], state: list[torch.Tensor], check: list[torch.Tensor], *,
                    warmup: int = 3, rtol: float = 1e-4, atol: float = 1e-5) -> GraphedStep | None:
        saved = [t.detach().clone() for t in state]

        def restore() -> None:
            with torch.no_grad():
                for t, s in zip(state, saved):
                    t.copy_(s)

        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    restore()
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            restore()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            restore()
            graph.replay()
            replayed = [t.detach().clone() for t in check]
            restore()
            step()
            eager = [t.detach().clone() for t in check]
            restore()
        except Exception as err:  # noqa: BLE001 - any capture failure means: run eagerly
            restore()
            warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); running eagerly",
                          RuntimeWarning, stacklevel=3)
            return None
        same = all(torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True) for a, b in zip(replayed, eager))
        if not same:
            warnings.warn("the CUDA graph replay did not match an eager step; running eagerly", RuntimeWarning,
                          stacklevel=3)
            return None
        return cls(graph)


class GraphCache:
    """CUDA graphs of a step, one per key (a batch shape), for loops whose batches come in a few
    shapes. A key is captured at its ``after``-th use (rare shapes, such as an epoch's last
    partial batch, stay eager); a failed capture is remembered and that key runs eagerly.

    ``run(key, step, state, check)``: ``step`` reads and writes only static tensors of that key;
    ``state`` and ``check`` are as in :meth:`GraphedStep.try_capture`.
    """

    def __init__(self, enabled: bool, after: int = 3):
        self.enabled, self.after = enabled, after
        self.uses: dict = {}
        self.graphs: dict = {}

    @property
    def captured(self) -> int:
        return sum(g is not None for g in self.graphs.values())

    def keep(self, wanted: Callable[[object], bool]) -> None:
        """Forget every key (and free its graph) for which ``wanted(key)`` is false."""
        self.uses = {k: n for k, n in self.uses.items() if wanted(k)}
        self.graphs = {k: g for k, g in self.graphs.items() if wanted(k)}

    def run(self, key, step: Callable[[], None], state: list[torch.Tensor], check: list[torch.Tensor]) -> None:
        if not self.enabled:
            step()
            return
        if key not in self.graphs:
            self.uses[key] = self.uses.get(key, 0) + 1
            if self.uses[key] < self.after:
                step()
                return
            self.graphs[key] = GraphedStep.try_capture(step, state, check)
        graph = self.graphs[key]
        (graph or step)()


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak memory of what follows (CUDA: the allocator's peak; the CPU
    keeps one process-wide peak that cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, int | str]:
    """The peak memory since :func:`reset_peak_memory`: on CUDA the most bytes the caching
    allocator held for tensors (``torch.cuda.max_memory_allocated``); on the CPU the process's
    peak resident set size (since the process started: every earlier allocation counts)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda max_memory_allocated"}
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_bytes": int(rss if sys.platform == "darwin" else rss * 1024),
            "peak_memory_kind": "process peak RSS"}


def check_micro_batch(micro_batch: int | str | None, batch: int, what: str = "batch") -> int | None:
    """``micro_batch`` checked against the (per-rank) ``batch`` it splits: None (the whole batch),
    "auto" (returned as None here; the engine derives it), or a positive divisor of ``batch``."""
    if micro_batch is None or micro_batch == "auto":
        return None
    if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
        raise InputError(f"micro_batch must be a positive integer, 'auto' or None, got {micro_batch!r}")
    if micro_batch > batch or batch % micro_batch:
        divisors = [d for d in range(1, batch + 1) if batch % d == 0]
        raise InputError(f"micro_batch {micro_batch} must divide the {what} of {batch} into equal micro-batches; "
                         f"divisors of {batch}: {', '.join(map(str, divisors))}")
    return micro_batch


def micro_batch_from_memory(batch: int, per_sample_bytes: float, free_bytes: int, headroom: float = 0.8) -> int:
    """The largest divisor of ``batch`` whose micro-batch fits in ``headroom * free_bytes`` at
    ``per_sample_bytes`` (measured); at least 1."""
    fits = int(headroom * free_bytes // max(per_sample_bytes, 1.0))
    return max((d for d in range(1, batch + 1) if batch % d == 0 and d <= fits), default=1)
