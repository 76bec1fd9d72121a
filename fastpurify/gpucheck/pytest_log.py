"""A pytest plugin (``-p fastpurify.gpucheck.pytest_log``) that appends one JSON line per test
outcome to the file named by ``FASTPURIFY_GPUCHECK_LOG`` as soon as it is known, so a test run
killed at its deadline still says which tests passed, failed or were skipped (with pytest-xdist
the reports reach the controller, which alone writes them)."""

from __future__ import annotations

import json
import os

LOG_ENV = "FASTPURIFY_GPUCHECK_LOG"


def pytest_runtest_logreport(report):
    path = os.environ.get(LOG_ENV)
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
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
    """The outcomes written so far (one per test; a failed teardown adds an entry)."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []
