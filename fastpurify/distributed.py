"""The torch.distributed layer of the engines: who this process is, its share of the work, and
the few collectives data-parallel ANP and PBE need.

Without an initialised default process group everything is the one-process case: world size 1,
rank 0, a shard is everything, collectives do nothing. Every collective goes through
:func:`_collective`, which turns a failure (a rank that died, a timeout) into a
:class:`DistributedError` that says what happened instead of a bare backend error.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .validation import InputError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed or timed out (another rank probably stopped with an error)."""


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    return rank() == 0


def _local_rank() -> int:
    """``LOCAL_RANK`` as torchrun sets it; without it, the rank modulo the visible GPUs."""
    if "LOCAL_RANK" in os.environ:
        return _int_variable("LOCAL_RANK")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return rank() % count if count else 0


def _int_variable(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise InputError(f"the environment variable {name} must be an integer, got {value!r}") from None


# -- the process group ------------------------------------------------------------------------

def init_from_environment(timeout_s: float = 300.0, backend: str | None = None) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1 with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` set) with no group yet: initialise the default group (NCCL with CUDA, else
    gloo; or ``backend``) whose collectives time out after ``timeout_s`` seconds, and on CUDA
    select this rank's GPU (``LOCAL_RANK``). Returns whether it initialised one (then call
    :func:`shutdown` when done). Outside torchrun, or with a group already there: False."""
    if _active() or "WORLD_SIZE" not in os.environ or _int_variable("WORLD_SIZE") <= 1:
        return False
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set: launch the processes with torchrun, which "
                         "sets them all (or unset WORLD_SIZE to run in one process)")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise InputError(f"the collective timeout must be a finite number of seconds > 0, got {timeout_s!r}")
    if not dist.is_available():
        raise InputError("this PyTorch build has no torch.distributed; run in one process (without torchrun)")
    cuda = torch.cuda.is_available()
    if cuda:
        local, count = _int_variable("LOCAL_RANK"), torch.cuda.device_count()
        if not 0 <= local < count:
            raise InputError(f"LOCAL_RANK is {local} but {count} CUDA device(s) are visible: run at most {count} "
                             "process(es) per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
    backend = backend or ("nccl" if cuda else "gloo")
    _collective("init_process_group", dist.init_process_group, backend,
                timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Destroy the default group, if there is one."""
    if _active():
        dist.destroy_process_group()


def local_device(device: torch.device | str | None) -> torch.device:
    """The device this rank computes on.

    Under a process group with CUDA, a CUDA device (or None) means this rank's own GPU,
    ``cuda:LOCAL_RANK`` (so ``device="cuda"`` does not put every rank on GPU 0). Otherwise the
    given device, unchanged; None is ``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
    device = None if device is None else torch.device(device)
    if not torch.cuda.is_available():
        return device if device is not None else torch.device("cpu")
    if device is None or (device.type == "cuda" and _active()):
        return torch.device("cuda", _local_rank())
    return device


# -- shares of the work -----------------------------------------------------------------------

def part_of(n: int) -> slice:
    """This rank's contiguous part of ``n`` items (balanced: the first ``n % world`` ranks take
    one more, in rank order); empty when there are fewer items than ranks."""
    world, r = world_size(), rank()
    per, extra = divmod(n, world)
    start = r * per + min(r, extra)
    return slice(start, start + per + (1 if r < extra else 0))


def _check_count(n: int, name: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"{name} must be an integer >= 0, got {n!r}")


def shard(n: int, what: str) -> slice:
    """This rank's :func:`part_of` ``n`` items (``what`` names them in the error): every rank
    needs at least one."""
    _check_count(n, f"the number of {what}")
    if n < world_size():
        raise InputError(f"the world size {world_size()} is larger than the {n} {what}: every rank needs at least "
                         "one; use fewer processes")
    return part_of(n)


def batch_shard(batch_size: int) -> slice:
    """This rank's equal share of a batch of ``batch_size``."""
    _check_count(batch_size, "batch_size")
    world = world_size()
    if batch_size == 0 or batch_size % world:
        lower, higher = batch_size // world * world, (batch_size // world + 1) * world
        hint = f"e.g. {lower} or {higher}" if lower else f"e.g. {higher}"
        raise InputError(f"batch_size {batch_size} must be divisible by the world size {world}: every rank takes an "
                         f"equal share of each batch; change batch_size to a multiple of {world} ({hint}) or the "
                         "number of processes")
    return part_of(batch_size)


# -- collectives ------------------------------------------------------------------------------

def _group_timeout() -> str:
    """The default group's collective timeout, in words (best effort: not every backend or
    PyTorch version tells)."""
    try:
        device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
        seconds = dist.group.WORLD._get_backend(device).options._timeout.total_seconds()
        return f"{seconds:g} s here"
    except Exception:  # noqa: BLE001 - only for the message
        return "set when the group was initialised"


def _collective(op: str, call: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``; a failure becomes a :class:`DistributedError` (the one place)."""
    try:
        return call(*args, **kwargs)
    except DistributedError:
        raise
    except (RuntimeError, TimeoutError, ConnectionError) as err:  # DistBackendError, DistStoreError, gloo timeouts
        raise DistributedError(
            f"rank {rank()}: {op} failed ({err}): another rank probably stopped with an error or timed out; see its "
            f"output. Collectives time out after the process group's timeout ({_group_timeout()}; "
            "--dist-timeout under the fastpurify commands)") from err


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of ``tensor`` over the ranks (nothing in one process). Returns it."""
    if world_size() > 1:
        _collective("all_reduce", dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(tensor: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank holds its :func:`shard` of ``total`` rows (dim 0) of a tensor; returns all
    ``total`` rows, in rank order, on every rank (the tensor itself in one process). The ranks'
    tensors must agree in dtype and in the shape after dim 0."""
    world = world_size()
    mine = shard(total, "rows to gather") if world > 1 else slice(0, total)
    if tensor.dim() == 0 or tensor.shape[0] != mine.stop - mine.start:
        raise InputError(f"rank {rank()} must hold its {mine.stop - mine.start} of the {total} rows (rows "
                         f"{mine.start}..{mine.stop - 1}) to gather, got a tensor of shape {tuple(tensor.shape)}")
    if world == 1:
        return tensor
    wire = tensor.contiguous()
    if wire.dtype == torch.bool:
        wire = wire.view(torch.uint8)  # the same bytes, a dtype every backend and version gathers
    longest = -(-total // world)  # the first rank's part is the largest
    padded = wire.new_zeros((longest, *wire.shape[1:]))
    padded[:wire.shape[0]] = wire
    pieces = [torch.empty_like(padded) for _ in range(world)]
    _collective("all_gather", dist.all_gather, pieces, padded)
    per, extra = divmod(total, world)
    out = torch.cat([piece[:per + (1 if r < extra else 0)] for r, piece in enumerate(pieces)])
    return out.view(torch.bool) if tensor.dtype == torch.bool else out


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: rank ``src``'s ``tensor`` on every rank. Returns it."""
    if world_size() > 1:
        _collective("broadcast", dist.broadcast, tensor, src)
    return tensor


def barrier() -> None:
    """Wait until every rank is here."""
    if world_size() > 1:
        _collective("barrier", dist.barrier)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _difference(mine: str, main: str) -> str:
    """Where a rank's value differs from rank 0's: the differing keys of two dicts, else both values."""
    a, b = json.loads(mine), json.loads(main)
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))
        show = lambda d: ", ".join(f"{k}={_shorten(json.dumps(d.get(k, '<missing>')), 60)}" for k in keys)  # noqa: E731
        return f"{show(a)} where rank 0 has {show(b)}"
    return f"{_shorten(mine)} where rank 0 has {_shorten(main)}"


def check_agree(value: Any, what: str) -> None:
    """Every rank must pass an equal ``value`` (JSON-able, e.g. the data size and settings; other
    objects are compared by repr); otherwise every rank raises an :class:`InputError` naming the
    ranks that differ from rank 0 and where."""
    world = world_size()
    if world == 1:
        return
    values: list[Any] = [None] * world
    _collective("all_gather_object", dist.all_gather_object, values, _canonical(value))
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        shown = "; ".join(f"rank {r}: {_difference(values[r], values[0])}" for r in differ[:4])
        more = f"; and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise InputError(f"the ranks disagree on {what}: rank(s) {differ} differ from rank 0 ({shown}{more}); every "
                         "rank must be given the same")


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on rank 0 only (e.g. writing outputs) and return its result
    there (None elsewhere); the other ranks wait for it. If it raises, rank 0 raises that error
    and the others a :class:`DistributedError` that names it (rather than waiting to time out)."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    result, error, failure = None, None, [None]
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
            error, failure[0] = err, f"{type(err).__name__}: {err}"
    _collective("broadcast_object_list", dist.broadcast_object_list, failure, 0)
    if error is not None:
        raise error
    if failure[0] is not None:
        name = getattr(fn, "__qualname__", repr(fn))
        raise DistributedError(f"rank {rank()}: rank 0 failed in {name} ({failure[0]}); see its output")
    return result
