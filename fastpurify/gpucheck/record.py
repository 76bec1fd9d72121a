"""What a stage of the GPU check writes as it goes: one JSON file per stage, rewritten atomically
after every measurement, so a stage killed at its deadline still leaves everything it measured.

A stage runs in its own process (see :mod:`fastpurify.gpucheck.plan`); it gets a deadline
(seconds on ``time.monotonic``) and asks :meth:`StageRecord.left` before each step.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

from ..files import write_json

COMMIT_ENV = "FASTPURIFY_COMMIT"


def status_of(steps: list[dict]) -> str:
    """A stage's status from its steps: ok when every step passed, partial when some were
    skipped or failed, failed when none ran."""
    ran = [s for s in steps if s["status"] == "ok"]
    return "ok" if steps and len(ran) == len(steps) else ("partial" if ran else "failed")


class StageRecord:
    """The stage's JSON: ``stage``, ``status`` (running, ok, partial, failed, skipped), ``reason``,
    ``seconds``, ``commit``, ``steps`` (one entry per step: name, status, seconds, reason) and
    whatever the stage adds with :meth:`put`."""

    def __init__(self, out_dir: Path, stage: str, seconds: float, *, dry_run: bool):
        self.path = Path(out_dir) / f"{stage}.json"
        self.start = time.monotonic()
        self.deadline = self.start + seconds
        self.data: dict[str, Any] = {"stage": stage, "status": "running", "reason": "", "seconds": 0.0,
                                     "allotted_seconds": round(seconds, 1), "dry_run": dry_run,
                                     "commit": os.environ.get(COMMIT_ENV, "unknown"), "steps": []}
        self.save()

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.monotonic()

    def put(self, **values: Any) -> None:
        self.data.update(values)
        self.save()

    def step(self, name: str, status: str, started: float, reason: str = "") -> None:
        """Record one step's outcome (``started``: its ``time.monotonic()`` start)."""
        self.data["steps"].append({"name": name, "status": status, "seconds": round(time.monotonic() - started, 2),
                                   "reason": reason})
        self.save()

    def skip_step(self, name: str, reason: str) -> None:
        self.data["steps"].append({"name": name, "status": "skipped", "seconds": 0.0, "reason": reason})
        self.save()

    def run_step(self, name: str, fn, *, need: float = 0.0, optional: bool = True):
        """``fn()`` as a step, unless fewer than ``need`` seconds are left (skipped: "budget"). An
        exception is recorded as the step's failure and, for an ``optional`` step, swallowed (the
        stage goes on); returns ``fn()``'s value or None."""
        if self.left() < need:
            self.skip_step(name, f"budget: {self.left():.0f} s left, the step needs about {need:.0f} s")
            return None
        started = time.monotonic()
        print(f"[{self.data['stage']}] {name} ({self.left():.0f} s left)", flush=True)
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - recorded, and re-raised for a required step
            self.step(name, "failed", started, f"{type(err).__name__}: {str(err)[:500]}")
            traceback.print_exc()
            if not optional:
                raise
            return None
        self.step(name, "ok", started)
        return value

    def finish(self, status: str | None = None, reason: str = "") -> None:
        """Final status: given, or :func:`status_of` its steps."""
        if status is None:
            status = status_of(self.data["steps"])
        self.data.update(status=status, reason=reason or self.data["reason"],
                         seconds=round(time.monotonic() - self.start, 2))
        self.save()

    def save(self) -> None:
        self.data["seconds"] = round(time.monotonic() - self.start, 2)
        write_json(self.path, self.data)
