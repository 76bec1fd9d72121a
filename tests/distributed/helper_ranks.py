"""What each rank runs in the tests of fastpurify.distributed (module-level functions, imported
by name as ``tests.distributed.helper_ranks`` in the children of the harness). Each groups
several checks, since every spawn costs seconds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastpurify import distributed as D
from fastpurify.validation import InputError


def _error(call, *args):
    """The type and message of what ``call(*args)`` raises (None if nothing)."""
    try:
        call(*args)
    except Exception as err:  # noqa: BLE001 - returned for the parent to check
        return type(err).__name__, str(err)
    return None


def helpers(rank: int, world: int, out_dir: str) -> dict:
    """Every helper on this rank, under the harness's group."""
    answers: dict = dict(ids=(D.world_size(), D.rank(), D.is_main()), device=str(D.local_device(None)),
                         already=D.init_from_environment())
    answers["shards"] = {n: (D.shard(n, "items").start, D.shard(n, "items").stop) for n in (world, 7, 8, 10, 11)}
    answers["batch"] = (D.batch_shard(6 * world).start, D.batch_shard(6 * world).stop)
    answers["batch_error"] = _error(D.batch_shard, 6 * world + 1)
    answers["shard_error"] = _error(D.shard, world - 1, "images to score")

    t = torch.tensor([1.5, -2.0, 0.375], dtype=torch.float64) * (rank + 1)
    answers["sum_in_place"] = D.all_reduce_sum_(t) is t
    answers["sum"] = t

    rows = D.shard(7, "rows")
    full = torch.arange(21, dtype=torch.float64).reshape(7, 3) / 3
    flags = torch.tensor([True, False, False, True, True, False, True])
    answers["gathered"] = {
        "float64": D.all_gather_rows(full[rows].clone(), 7),
        "float32": D.all_gather_rows(full[rows].float(), 7),
        "int64": D.all_gather_rows(torch.arange(7)[rows] * 10, 7),
        "bool": D.all_gather_rows(flags[rows], 7),
        "columns": D.all_gather_rows(full.t().contiguous()[:, rows].t(), 7),  # a non-contiguous share
    }
    answers["gather_error"] = _error(D.all_gather_rows, full, 7)  # every rank passes all rows: refused locally

    b = torch.full((2, 2), float(rank))
    answers["broadcast"] = D.broadcast_(b, src=world - 1).clone()
    D.barrier()

    D.check_agree({"n": 7, "layers": ["batchnorm"], "eps": 0.4}, "the settings")
    mixed = {"n": 7, "layers": ["batchnorm"], "seed": 5 if rank == world - 1 else 0}
    answers["disagree"] = _error(D.check_agree, mixed, "the ANP settings")

    path = os.path.join(out_dir, "out.txt")
    answers["on_main"] = D.on_main(_append, path, f"rank {rank}\n")
    answers["written"] = Path(path).read_text()  # after on_main's wait: every rank sees the file whole
    answers["on_main_error"] = _error(D.on_main, _fail)
    D.barrier()  # the group still works after a failed on_main

    answers["reinit"] = _reinit(rank)
    return answers


def _append(path: str, text: str) -> str:
    with open(path, "a") as f:
        f.write(text)
    return path


def _fail():
    raise ValueError("the output folder is read-only")


def _reinit(rank: int) -> dict:
    """Leave the harness's group and join one through :func:`init_from_environment`, as under
    torchrun (the harness sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR; a fresh port)."""
    port = [_free_port() if rank == 0 else None]
    dist.broadcast_object_list(port, src=0)
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port[0])
    made = D.init_from_environment(timeout_s=30)
    total = D.all_reduce_sum_(torch.ones(1, dtype=torch.int64))
    message = ""
    try:
        D._collective("a test op", _raise_runtime)
    except D.DistributedError as err:
        message = str(err)
    D.shutdown()
    return dict(made=made, world=int(total), after=(D.world_size(), D.rank()), message=message)


def _raise_runtime():
    raise RuntimeError("Connection closed by peer")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(op: str, call) -> tuple:
    """(the DistributedError's message or None, seconds, the type of its cause) of ``call()``."""
    start = time.monotonic()
    try:
        call()
    except D.DistributedError as err:
        return str(err), time.monotonic() - start, type(err.__cause__).__name__
    return None, time.monotonic() - start, None


def stuck(rank: int, world: int, wait_s: float) -> dict:
    """Rank 1 is elsewhere for ``wait_s`` seconds (longer than the group's timeout), then stops
    with an error; rank 0 waits in all_reduce (times out), then tries a barrier."""
    if rank == 1:
        time.sleep(wait_s)
        raise ValueError("rank 1 gives up")
    return dict(all_reduce=_timed("all_reduce", lambda: D.all_reduce_sum_(torch.ones(3, dtype=torch.float64))),
                barrier=_timed("barrier", D.barrier))


def dies(rank: int, world: int) -> tuple:
    """The last rank's process ends (exit code 3) before the collective; the others wait in
    all_reduce_sum_ and must get a DistributedError at once. Every rank first passes a barrier, so
    the last one cannot end while the others are still setting up the group (a loaded machine
    made them fail there instead: the race, not the behaviour under test)."""
    dist.barrier()
    if rank == world - 1:
        os._exit(3)
    return _timed("all_reduce", lambda: D.all_reduce_sum_(torch.ones(3, dtype=torch.float64)))


def sleeps(rank: int, world: int) -> None:
    time.sleep(600)
