"""A pytest plugin (``-p fastpurify.gpucheck.pytest_log``) that appends one JSON line per test
outcome to the file named by ``FASTPURIFY_GPUCHECK_LOG`` as soon as it is known, so a test run
killed at its deadline still says which tests passed, failed or were skipped (with pytest-xdist
the reports reach the controller, which alone writes them)."""

from __future__ import annotations

import json
import os

LOG_ENV = "FASTPURIFY_GPUCHECK_LOG"

_xdist_worker = False


def pytest_configure(config):
    """Whether this process is an xdist worker of this session (its config says so; an inherited
    ``PYTEST_XDIST_WORKER`` would also be set in a pytest started from inside a worker's test)."""
    global _xdist_worker
    _xdist_worker = hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    path = os.environ.get(LOG_ENV)
    if not path or _xdist_worker:
        return  # under xdist the controller writes every worker's reports once
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or \
            (report.when == "teardown" and report.outcome == "failed"):
        outcome = report.outcome
        message = ""
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = (crash.message if crash is not None else
                       (report.longreprtext.strip().splitlines() or [""])[-1])[:600]
        elif report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])[:300]
        line = {"test": report.nodeid, "when": report.when, "outcome": outcome,
                "seconds": round(report.duration, 3), "message": message}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def read(path) -> list[dict]:
    """The outcomes written so far, one per (test, phase) (a failed teardown adds an entry; a
    repeated line, as older runs under xdist wrote, counts once)."""
    try:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []
    seen, out = set(), []
    for o in lines:
        if (o["test"], o["when"]) not in seen:
            seen.add((o["test"], o["when"]))
            out.append(o)
    return out


def summarize(path) -> dict:
    """Counts by outcome, how many ran, the failures and the five slowest tests of a log."""
    outcomes = read(path)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
    return {"counts": counts, "ran": len(outcomes),
            "failures": [{"test": o["test"], "when": o["when"], "message": o["message"]} for o in outcomes
                         if o["outcome"] == "failed"],
            "slowest": sorted(({"test": o["test"], "seconds": o["seconds"]} for o in outcomes),
                              key=lambda o: -o["seconds"])[:5]}
