"""``python -m fastpurify.gpucheck --out DIR [--budget 480]`` (``make gpu-check OUT=DIR``): one
prepared command that proves fastpurify on an NVIDIA GPU inside a short time budget and leaves
all its evidence in one folder.

Stages, in order, each in its own process with its share of the time still left, in proportion
to the seconds it is expected to need on an H200 (a stage that would overrun is cut off and keeps
what it measured; the command always ends inside its budget): environment (install, versions,
copy bandwidth) -> tests (gpu-marked tests and the kernel suites compiled on CUDA) -> sanitizer
(memcheck, racecheck) -> bn (fused BatchNorm vs PyTorch, compile, cuDNN) -> bnplans (the launch
plans swept) -> anp -> pgd -> pbe -> large (ResNet-50, ViT-B/16) -> cifar (real-data fidelity).
``--estimate`` runs nothing and prints those seconds against the budget, with a split into calls
that fit where it falls short.

Into DIR: ``<stage>.json`` for each stage, ``logs/``, ``gpucheck.json`` (everything) and
``summary.md`` (each target, measured value, met or not). ``--dry-run`` runs the same plan on
CPU at smoke sizes, so the command is known to work before a GPU sees it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..validation import InputError

DEFAULT_BUDGET_S = 480


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .plan import STAGE_NAMES

    p = argparse.ArgumentParser(prog="python -m fastpurify.gpucheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for the evidence (created)")
    p.add_argument("--summarize", metavar="DIR", default=None,
                   help="run nothing: write DIR's summary.md and gpucheck.json again from its records (a run cut "
                        "off before its summary, or written by an older version)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for the whole command (default: %(default)s)")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of: {', '.join(STAGE_NAMES)} (default: all)")
    p.add_argument("--dry-run", action="store_true", help="the same plan on CPU at smoke sizes (no GPU needed)")
    p.add_argument("--estimate", action="store_true",
                   help="run nothing: print the seconds the chosen stages are expected to take on an H200 against "
                        "--budget, and a split into commands that fit one device call when it falls short")
    p.add_argument("--cifar", default=None, help="the CIFAR-10 JPEG tarball inside the checkout (stage cifar)")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse HEAD, if a .git is "
                                                  "there)")
    p.add_argument("--results-dir", default=None,
                   help="also write gpucheck-<device>-<date>.json here (default: bench/results on a GPU, none in a "
                        "dry run)")
    return p.parse_args(argv)


def report(out_dir: Path, result: dict) -> int:
    """Print the summary and where the combined JSON went; the command's exit status."""
    print((out_dir / "summary.md").read_text())
    if "results_path" in result:
        print(f"wrote {result['results_path']}")
    return 0


def print_estimate(stages: tuple[str, ...], budget: float, cifar: str | None) -> int:
    """``--estimate``: the plan's expected seconds on the GPU, from any machine (the sanitizer is
    taken to be there, as on the device machine; every other stage by the run's own check)."""
    from .plan import cannot_run, describe_estimate, estimate

    runnable = lambda name: name == "sanitizer" or cannot_run(name, dry_run=False, cifar=cifar) is None  # noqa: E731
    print("\n".join(describe_estimate(estimate(stages, budget, runnable))))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .environment import ROOT
    from .plan import check_can_run, choose_stages, run_plan

    args = parse_args(argv)
    if args.summarize:
        from .summary import rebuild

        folder = Path(args.summarize)
        if not (folder / "logs").is_dir() and not any(folder.glob("*.json")):
            print(f"fastpurify gpu-check: error: {folder} holds no GPU-check records", file=sys.stderr)
            return 2
        return report(folder, rebuild(folder, Path(args.results_dir) if args.results_dir else None))
    try:
        if not args.budget > 0:
            raise InputError(f"--budget must be a positive number of seconds, got {args.budget}")
        stages = choose_stages(args.stages)
        if args.estimate:
            return print_estimate(stages, args.budget, args.cifar)
        if not args.out:
            raise InputError("--out DIR is required (the folder for the evidence)")
        check_can_run(args.dry_run)
    except InputError as err:
        print(f"fastpurify gpu-check: error: {err}", file=sys.stderr)
        return 2
    results_dir = Path(args.results_dir) if args.results_dir else (None if args.dry_run else ROOT / "bench/results")
    result = run_plan(Path(args.out), budget=args.budget, stages=stages, dry_run=args.dry_run, cifar=args.cifar,
                      commit=args.commit, results_dir=results_dir, root=ROOT)
    print()
    return report(Path(args.out), result)
