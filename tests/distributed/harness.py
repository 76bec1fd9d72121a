"""Run a function in several processes joined by a gloo process group (CPU), for the tests.

``run_ranks(fn, world, *args)`` starts ``world`` fresh interpreters (subprocesses of this
Python, with the repository root on ``PYTHONPATH`` and this process's environment, so
``TRITON_INTERPRET`` and ``FASTPURIFY_BACKEND`` carry over). Each sets one torch thread and the
torchrun variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``),
joins a gloo group on 127.0.0.1 at a free port with the given collective timeout, runs
``fn(rank, world, *args)``, writes its result (plain pickle) or its traceback to a file, and
destroys the group. ``run_ranks`` returns the results in rank order, or raises
:class:`RanksFailed` with every failed rank's traceback (and the tail of its output). The
whole run has a deadline, after which every child is killed: a test never hangs.

``fn`` must be a module-level function of a module importable by name from the repository
root (e.g. ``tests.distributed.ranks``): the children import it as ``module:qualname``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.05
GRACE_S = 5.0  # after every rank has reported, how long a child may take to exit before it is killed


class RanksFailed(AssertionError):
    """A rank raised, exited without a result, or the run passed its deadline. ``failures``:
    {rank: traceback or how it stopped}; ``results``: {rank: result} of the ranks that finished."""

    def __init__(self, message: str, failures: dict[int, str], results: dict[int, object]):
        super().__init__(message)
        self.failures, self.results = failures, results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(fn) -> str:
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in name or "<lambda>" in name:
        raise TypeError(f"run_ranks needs a module-level function of an importable module (the children import "
                        f"it by name), got {fn!r} from module {module!r}")
    return f"{module}:{name}"


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _run_once(fn, world: int, args: tuple, timeout_s: float, backend: str, deadline_s: float):
    """One attempt: {rank: (ok, value or traceback text)}, and the failure report of any rank
    with no result."""
    work = Path(tempfile.mkdtemp(prefix="fastpurify-ranks-"))
    try:
        (work / "task.pkl").write_bytes(pickle.dumps((_reference(fn), args, timeout_s, backend)))
        port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        procs = []
        try:
            for r in range(world):
                with open(work / f"out{r}.txt", "wb") as out:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-c", "from tests.distributed.harness import _child; _child()", str(work)],
                        cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=out,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            end, reported_at = time.monotonic() + deadline_s, None
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if reported_at is None and all((work / f"result{r}.pkl").exists() for r in range(world)):
                    reported_at = now
                if now > end or (reported_at is not None and now > reported_at + GRACE_S):
                    break
                time.sleep(POLL_S)
            timed_out = time.monotonic() > end
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        got, missing = {}, {}
        for r, p in enumerate(procs):
            result = work / f"result{r}.pkl"
            if result.exists():
                got[r] = pickle.loads(result.read_bytes())
            else:
                why = (f"still running at the deadline of {deadline_s:g} s (killed)" if timed_out
                       else f"exited with code {p.returncode} without a result")
                missing[r] = f"{why}; its output:\n{_tail(work / f'out{r}.txt')}"
        for r, (ok, _) in got.items():
            if not ok:
                got[r] = (False, got[r][1] + f"\nits output:\n{_tail(work / f'out{r}.txt')}")
        return got, missing
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_ranks(fn, world: int, *args, timeout_s: float = 60.0, backend: str = "gloo", deadline_s: float | None = None,
              may_fail: frozenset[int] = frozenset()) -> list:
    """Every rank's ``fn(rank, world, *args)``, in rank order (see the module docstring).

    ``timeout_s`` is the process group's collective timeout; ``deadline_s`` (default
    ``timeout_s + 120``) bounds the whole run. The ranks in ``may_fail`` may fail: their result
    is then the text of their traceback (or of how they stopped)."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an integer >= 1, got {world!r}")
    deadline_s = timeout_s + 120.0 if deadline_s is None else deadline_s
    for attempt in range(2):
        got, missing = _run_once(fn, world, args, timeout_s, backend, deadline_s)
        # the free port can be taken between finding it and rank 0 binding it: then try once more
        ok0, text0 = got.get(0, (True, None))
        if attempt == 0 and not ok0 and ("EADDRINUSE" in text0 or "address already in use" in text0.lower()):
            continue
        break
    failed = {r: text for r, (ok, text) in got.items() if not ok}
    failed.update(missing)
    unexpected = sorted(set(failed) - set(may_fail))
    if unexpected:
        raise RanksFailed(f"{len(unexpected)} of {world} rank(s) failed:\n" + "\n".join(
            f"--- rank {r} ---\n{failed[r]}" for r in sorted(failed)), failed,
            {r: value for r, (ok, value) in got.items() if ok})
    return [failed[r] if r in failed else got[r][1] for r in range(world)]


def _child() -> None:
    """A rank: the entry point of each subprocess (argument: the run's work folder)."""
    import datetime
    import importlib
    import traceback

    import torch
    import torch.distributed as dist

    work, r = Path(sys.argv[1]), int(os.environ["RANK"])
    ok, value = False, None
    try:
        reference, args, timeout_s, backend = pickle.loads((work / "task.pkl").read_bytes())
        module, name = reference.split(":")
        fn = importlib.import_module(module)
        for part in name.split("."):
            fn = getattr(fn, part)
        torch.set_num_threads(1)
        world = int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=r,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        value, ok = fn(r, world, *args), True
        payload = pickle.dumps((True, value))
    except BaseException:  # noqa: BLE001 - reported to the parent
        payload = pickle.dumps((False, traceback.format_exc()))
    tmp = work / f".result{r}.pkl"
    tmp.write_bytes(payload)
    tmp.rename(work / f"result{r}.pkl")  # atomic: the parent never reads half a result
    sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(0 if ok else 1)
