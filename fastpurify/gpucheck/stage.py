"""One stage of the GPU check, in its own process:
``python -m fastpurify.gpucheck.stage NAME --out DIR --seconds S [--dry-run] [--cifar PATH]``.
Writes ``DIR/NAME.json`` as it goes (:class:`~fastpurify.gpucheck.record.StageRecord`)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from .plan import STAGE_NAMES
from .record import StageRecord

# Stage name -> "module:function"; each function takes (record, options) and fills the record.
RUNNERS = {
    "environment": "environment:run",
    "tests": "correctness:run_tests",
    "sanitizer": "correctness:run_sanitizer",
    "bn": "speed:run_bn",
    "bnplans": "speed:run_bn_plans",
    "anp": "speed:run_anp",
    "pgd": "speed:run_pgd",
    "pbe": "speed:run_pbe",
    "large": "speed:run_large",
    "cifar": "fidelity:run",
}
assert set(RUNNERS) == set(STAGE_NAMES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastpurify.gpucheck.stage")
    p.add_argument("name", choices=STAGE_NAMES)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seconds", required=True, type=float)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--cifar", default=None)
    opts = p.parse_args(argv)
    record = StageRecord(opts.out, opts.name, opts.seconds, dry_run=opts.dry_run)
    module, function = RUNNERS[opts.name].split(":")
    try:
        run = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        run(record, opts)
    except Exception as err:
        record.finish("failed", f"{type(err).__name__}: {str(err)[:800]}")
        raise
    if record.data["status"] == "running":
        record.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
