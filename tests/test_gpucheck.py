"""The GPU check (``make gpu-check``): its dry run on CPU writes every file with the expected
fields, the budget is shared and kept, a stage past its time is cut off with what it wrote, and
bad input gets a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastpurify.gpucheck import main
from fastpurify.gpucheck.plan import (MIN_STAGE_S, STAGE_NAMES, STAGES, SUMMARY_RESERVE_S, allotments, cannot_run,
                                      describe_estimate, estimate, run_stage)
from fastpurify.gpucheck.summary import TARGETS, evaluate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One whole dry run (every stage, CPU smoke sizes), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("gpucheck")
    results = tmp_path_factory.mktemp("results")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fastpurify.gpucheck", "--dry-run", "--out", str(out), "--budget",
                           "240", "--results-dir", str(results), "--commit", "test-commit"],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    return out, results, proc, time.monotonic() - start


@pytest.mark.slow
def test_dry_run_writes_every_file(dry_run):
    out, results, proc, seconds = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 240 + 15
    for name in ("summary.md", "gpucheck.json"):
        assert (out / name).is_file()
    ran = [n for n in STAGE_NAMES if n not in ("sanitizer", "bnplans", "cifar")]
    for name in ran:
        assert (out / f"{name}.json").is_file(), name
        assert (out / "logs" / f"{name}.log").is_file(), name
    [combined] = results.glob("gpucheck-cpu-*threads-*.json")
    assert json.loads(combined.read_text()) == json.loads((out / "gpucheck.json").read_text())


def test_dry_run_records_what_each_stage_measured(dry_run):
    out = dry_run[0]
    result = json.loads((out / "gpucheck.json").read_text())
    assert result["gpucheck"]["dry_run"] is True and result["gpucheck"]["commit"] == "test-commit"
    stages = result["stages"]
    assert set(stages) == set(STAGE_NAMES)
    for name in ("environment", "tests", "bn", "anp", "pgd", "pbe", "large"):
        assert stages[name]["status"] == "ok", (name, stages[name].get("reason"), stages[name].get("steps"))
    assert "compute-sanitizer" in stages["sanitizer"]["reason"]
    assert "CUDA device" in stages["bnplans"]["reason"]
    assert "--cifar" in stages["cifar"]["reason"]
    env = result["environment"]
    for key in ("device", "torch", "triton", "python", "date"):
        assert env[key], key
    parts = stages["tests"]["parts"]
    assert parts["compiled"]["counts"].get("passed", 0) > 0 and not parts["compiled"]["failures"]
    assert parts["gpu-marked"]["counts"].get("skipped", 0) > 0  # no CUDA: collected, then skipped
    names = {v["name"] for v in stages["anp"]["anp"]["variants"]}
    assert {"reference", "fast"} <= names
    for key, precision in (("anp_end_to_end", "fp32"), ("anp_end_to_end_bf16", "bf16")):
        run = stages["anp"][key]
        assert run["iterations"] == 20 and run["precision"] == precision == run["engine"]["precision"]
    assert {v["name"] for v in stages["pgd"]["pgd"]["variants"]} == {"reference", "fast"}
    assert set(stages["pbe"]["pbe_profile"]) == {"reference", "fast"}  # where a round's time goes
    assert all(p["wall_ms_per_step"] > 0 and p["top"] for p in stages["pbe"]["pbe_profile"].values())
    assert len(stages["large"]["large"]) == 2
    assert stages["bn"]["bn"]["rows"]
    rows = {r["target"]: r for r in result["targets"]}
    assert set(rows) == {t.name for t in TARGETS} | {"whole command"}
    assert rows["ANP it/s vs reference"]["result"] == "dry run (CPU smoke figure)"
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "| ANP it/s vs reference |" in summary and "## Stages" in summary
    expected = {s.name: s.expected_s for s in STAGES}
    assert all(stages[n]["expected_seconds"] == expected[n] for n in stages if stages[n]["status"] != "skipped" or
               "not selected" not in stages[n]["reason"])
    assert f"| anp | ok | {stages['anp']['wall_seconds']:.0f} | {stages['anp']['allotted_seconds']:.0f} | " \
           f"{expected['anp']:.0f} |" in summary


def test_budget_shares_pass_unused_time_on():
    env, rest = STAGES[0], list(STAGES[1:])
    total = sum(s.expected_s for s in rest)
    assert allotments(400.0, rest) == pytest.approx(400.0 * rest[0].expected_s / total)
    # With fewer stages pending, each gets a larger part of what is left.
    assert allotments(100.0, [rest[0], rest[-1]]) > allotments(100.0, rest)
    # A stage's floor (the install takes its time) is kept when it leaves the others theirs.
    assert env.min_seconds > 400.0 * env.expected_s / sum(s.expected_s for s in STAGES)
    assert allotments(400.0, list(STAGES)) == env.min_seconds
    squeezed = allotments(60.0, list(STAGES))
    assert squeezed < env.min_seconds and 60.0 - squeezed >= MIN_STAGE_S * (len(STAGES) - 1) - 1e-9
    # A budget of the stages' expected seconds gives each at least its expectation (in plan order,
    # each using exactly that).
    chosen = [s for s in STAGES if s.name != "cifar"]
    left = sum(s.expected_s for s in chosen)
    for i, stage in enumerate(chosen):
        seconds = allotments(left, chosen[i:])
        assert seconds >= stage.expected_s - 1e-9, stage.name
        left -= stage.expected_s


def test_the_estimate_says_when_the_budget_is_short_and_how_to_split_it(capsys):
    """Before a run (and with ``--estimate``, from any machine): the chosen stages' expected seconds
    on an H200; a budget under them is named with the seconds missing and a split into commands that
    each fit the budget and one device call, in plan order, each with the environment stage."""
    everything = estimate(STAGE_NAMES, 480.0, lambda name: True)
    assert everything["total"] == pytest.approx(sum(s.expected_s for s in STAGES))
    assert everything["short_by"] == pytest.approx(everything["total"] - (480.0 - SUMMARY_RESERVE_S))
    calls = everything["calls"]
    assert len(calls) >= 2 and all(c["stages"][0] == "environment" for c in calls)
    assert [n for c in calls for n in c["stages"] if n != "environment"] == list(STAGE_NAMES[1:])
    assert all(c["expected"] <= 480.0 - SUMMARY_RESERVE_S for c in calls)
    lines = describe_estimate(everything)
    assert "warning" in lines[-1] and "STAGES=environment," in lines[-1] and f"{everything['short_by']:.0f} s short" \
        in lines[-1]
    # Enough budget: no warning; a stage that cannot run is left out of the sum.
    fits = estimate(("environment", "anp", "cifar"), 400.0, lambda name: name != "cifar")
    assert set(fits["expected"]) == {"environment", "anp"} and fits["short_by"] == 0.0
    assert len(describe_estimate(fits)) == 1
    # Over one device call: said, and the split keeps each command inside it.
    long = estimate(STAGE_NAMES, 2000.0, lambda name: True)
    assert long["over_one_call"] and "at most 600 s" in describe_estimate(long)[1]
    # The command line: no --out and no CUDA needed.
    assert main(["--estimate", "--stages", "environment,tests,bnplans,anp,pgd,pbe", "--budget", "300"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: environment 20, tests") and "s short" in out
    assert main(["--estimate", "--budget", "2000"]) == 0
    assert "cifar" not in capsys.readouterr().out.splitlines()[0]  # no --cifar tarball: the stage would skip


def test_stages_that_would_only_skip_get_no_time(tmp_path):
    assert "dry run" in cannot_run("sanitizer", dry_run=True, cifar=None)
    assert "--cifar" in cannot_run("cifar", dry_run=False, cifar=None)
    assert "no such file" in cannot_run("cifar", dry_run=False, cifar=str(tmp_path / "missing.tar.xz"))
    tarball = tmp_path / "cifar10-jpeg.tar.xz"
    tarball.write_bytes(b"")
    assert cannot_run("cifar", dry_run=False, cifar=str(tarball)) is None
    assert cannot_run("anp", dry_run=True, cifar=None) is None


def test_a_stage_past_its_time_is_killed_with_its_children_and_keeps_its_record(tmp_path, monkeypatch):
    """The stage is told it has 30 s more than the plan gives it, so it overruns: the plan kills
    it and the pytest it started at its deadline, and keeps the record it had written."""
    import os

    import fastpurify.gpucheck.plan as plan

    monkeypatch.setattr(plan, "KILL_GRACE_S", -30.0)
    (tmp_path / "logs").mkdir()
    stage = next(s for s in STAGES if s.name == "tests")
    start = time.monotonic()
    rec = run_stage(stage, 4.0, tmp_path, ["--dry-run"], env=dict(os.environ), root=ROOT)  # its pytest needs ~8 s
    assert time.monotonic() - start < 4.0 + 12
    assert rec["status"] == "timed out" and "killed after" in rec["reason"]
    assert rec["stage"] == "tests" and rec["allotted_seconds"] == 4.0
    time.sleep(0.5)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps  # neither the stage nor its pytest is left running


def test_targets_are_judged_from_the_records():
    stages = {"anp": {"anp": {"variants": [
        {"name": "reference", "median_ms": 50.0, "peak_memory_mb": 1000.0, "ratio_vs_reference": 1.0,
         "ratio_vs_compile": 0.5},
        {"name": "fast", "median_ms": 5.0, "peak_memory_mb": 1600.0, "ratio_vs_reference": 10.0,
         "ratio_vs_compile": 1.5},
        {"name": "fast-seeds4", "median_ms": 17.0, "ratio_vs_reference": 50 / 17}]},
        "anp_end_to_end": {"iterations": 300, "asked_iterations": 2000, "shortened": True, "seconds": 3.0,
                           "projected_seconds_for_asked": 20.0},
        "anp_end_to_end_bf16": {"iterations": 2000, "asked_iterations": 2000, "shortened": False, "seconds": 9.5,
                                "projected_seconds_for_asked": 9.5}}}
    rows = {r["target"]: r for r in evaluate(stages, seconds=100, budget=480)}
    assert rows["ANP 2,000 iterations end to end, bf16"]["result"] == "met"
    assert rows["ANP 2,000 iterations end to end, bf16"]["measured"] == "9.50 s"
    assert rows["ANP seed ensemble K = 4 vs one seed (issue 19)"]["result"] == "not met"  # 3.4x > 2x
    assert "17.00 ms/it vs 5.00 ms/it (3.40x)" == rows["ANP seed ensemble K = 4 vs one seed (issue 19)"]["measured"]
    assert rows["ANP it/s vs reference"]["result"] == "met"
    assert rows["ANP it/s vs reference + torch.compile"]["result"] == "not met"
    assert rows["ANP peak memory vs reference"]["result"] == "not met"  # 1.6x > 1.5x
    assert rows["ANP peak memory vs reference"]["measured"] == "1600 MB vs 1000 MB (1.60x)"
    assert rows["ANP 2,000 iterations end to end"]["result"] == "not met"
    assert "projected" in rows["ANP 2,000 iterations end to end"]["measured"]
    assert rows["PGD-10 images/s vs reference"]["result"] == "not measured"
    assert rows["whole command"]["result"] == "met"


def test_bad_input_gets_a_clear_message(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--dry-run", "--stages", "anp,nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "environment" in err
    assert main(["--out", str(tmp_path), "--dry-run", "--budget", "0"]) == 2
    assert "--budget" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_only_the_dry_run_runs(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "summary.md").exists()


def test_summary_can_be_written_again_from_the_records(dry_run, tmp_path, capsys):
    """A run cut off before its summary (the machine given back, say) still has its stage
    records: ``--summarize DIR`` writes summary.md and gpucheck.json from them."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(dry_run[0], out)
    before = json.loads((out / "gpucheck.json").read_text())
    (out / "summary.md").unlink()
    (out / "gpucheck.json").unlink()
    assert main(["--summarize", str(out)]) == 0
    after = json.loads((out / "gpucheck.json").read_text())
    assert [r["result"] for r in after["targets"]] == [r["result"] for r in before["targets"]]
    assert after["stages"]["tests"]["parts"]["compiled"]["counts"] == \
        before["stages"]["tests"]["parts"]["compiled"]["counts"]
    assert "## Targets" in (out / "summary.md").read_text()
    assert main(["--summarize", str(tmp_path / "empty")]) == 2
    assert "no GPU-check records" in capsys.readouterr().err


def test_the_committed_table_of_gpu_checks_is_generated_from_their_json():
    from fastpurify.gpucheck.results_table import render, runs

    results = ROOT / "bench" / "results"
    assert (results / "README.md").read_text() == render(Path("bench/results")), \
        "bench/results/README.md is stale: run python -m fastpurify.gpucheck.results_table bench/results"
    for _, r in runs(results):  # every committed run names its device and commit
        assert r["environment"].get("device") and r["gpucheck"]["commit"] != "unknown"


@pytest.mark.usefixtures("torch_backend")
def test_the_cifar_stage_runs_both_reproductions_in_a_dry_run(tmp_path):
    """The real-data stage on a tiny stand-in for the CIFAR-10 tarball (the same layout and classes)."""
    from fastpurify.gpucheck import fidelity
    from fastpurify.gpucheck.record import StageRecord
    from fastpurify.gpucheck.summary import evaluate

    from .data.image_folders import image_set, write_archive

    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    files, _ = image_set(classes=classes, per_class=(70, 30), size=(32, 32))
    tarball = write_archive(tmp_path / "cifar10-jpeg.tar.xz", files, top="cifar10-jpeg")
    record = StageRecord(tmp_path / "out", "cifar", 120.0, dry_run=True)
    opts = type("Options", (), {"cifar": str(tarball), "dry_run": True})()
    fidelity.run(record, opts)
    record.finish()
    data = json.loads((tmp_path / "out" / "cifar.json").read_text())
    assert data["status"] == "ok", data["steps"]
    assert [s["name"] for s in data["steps"]] == ["reproduce anp", "reproduce pbe"]
    assert [r["attack"] for r in data["anp"]["rows"]] == ["badnets", "none"]  # ANP's clean control
    assert [r["attack"] for r in data["pbe"]["rows"]] == ["badnets"] and data["pbe"]["runs"][0]["pbe"]["clean"]["acc"] >= 0
    assert "# ANP reproduction on CIFAR-10 (JPEG copy)" in data["table"] and "# PBE reproduction" in data["table"]
    assert (tmp_path / "out" / "cifar" / "anp" / "table.json").is_file()
    rows = {r["target"]: r for r in evaluate({"cifar": data}, 10.0, 120.0)}
    anp = rows["CIFAR-10 (JPEG copy): ANP, ResNet-18"]["measured"]
    assert anp.startswith("badnets: before ") and " — none: before " in anp and "/ n/a; threshold " in anp
    readings = [f"{r['attack']} s{r['seed']} {r['anp']['eps_reading']['value']:g}" for r in data["anp"]["runs"]]
    runs = data["anp"]["runs"]  # a subject whose backdoor did not implant is named (the smoke subject's often is not)
    assert [("warning" in r) for r in runs] == [r["before"]["asr"] is not None and r["before"]["asr"] < 0.8
                                                for r in runs]
    weak = [f"{r['attack']} s{r['seed']} ASR {100 * r['before']['asr']:.1f} before" for r in runs if "warning" in r]
    assert anp.endswith("; eps auto would read: " + ", ".join(readings)
                        + ("; the backdoor did not implant: " + ", ".join(weak) if weak else "")) and len(readings) == 2
    assert rows["CIFAR-10 (JPEG copy): PBE"]["result"] == "measured"


def test_a_pytest_started_inside_an_xdist_worker_still_logs(tmp_path):
    """make test runs on xdist workers, whose PYTEST_XDIST_WORKER the dry run's own pytest runs
    inherit: the log plugin must still write their outcomes (it asks its own session's config)."""
    from fastpurify.gpucheck import pytest_log

    (tmp_path / "test_tiny.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert False\n")
    log = tmp_path / "log.jsonl"
    env = dict(os.environ, PYTEST_XDIST_WORKER="gw0", **{pytest_log.LOG_ENV: str(log)})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                           "fastpurify.gpucheck.pytest_log", "test_tiny.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]
    summary = pytest_log.summarize(log)
    assert summary["counts"] == {"passed": 1, "failed": 1}
    assert [f["test"] for f in summary["failures"]] == ["test_tiny.py::test_bad"]


def test_sanitizer_summaries_are_not_findings():
    """Run 3 (H200) counted racecheck's own "RACECHECK SUMMARY: 0 hazards displayed" as a finding."""
    from fastpurify.gpucheck.correctness import findings

    clean = ("========= COMPUTE-SANITIZER\n.............\n"
             "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
             "========= ERROR SUMMARY: 0 errors\n")
    assert findings(clean) == []
    hazard = "========= Error: Race reported between Write access at bn_stats_kernel+0x1a0\n"
    invalid = "========= Invalid __global__ read of size 4 bytes\n"
    assert findings(clean + hazard + invalid) == [hazard.strip(), invalid.strip()]
    from fastpurify.gpucheck.correctness import judge

    assert judge({"exit_code": 0, "timed_out": False}, clean)["clean"]
    assert not judge({"exit_code": 0, "timed_out": False}, clean + hazard)["clean"]
    assert not judge({"exit_code": 0, "timed_out": True}, clean)["clean"]  # cut off: not every process summarised
    assert not judge({"exit_code": None, "timed_out": False}, ".....\n")["clean"]  # no summary at all


def test_the_cifar_stage_gives_the_clean_control_a_subjects_share_of_training():
    """ANP's table holds a clean control from 240 s on, trained on the same time per subject as the backdoored
    ones (the budget grows with the subjects, not split thinner); PBE keeps the backdoored subjects only."""
    from fastpurify.gpucheck.fidelity import plan

    shared, anp, pbe = plan(300.0, dry_run=False)
    assert anp["attacks"] == ("badnets", "blend", "none") and pbe["attacks"] == ("badnets", "blend")
    assert anp["budget"] / 3 == pytest.approx(pbe["budget"] / 2) == pytest.approx(0.35 * 300 / 2)
    assert "attacks" not in shared and "budget" not in shared
    _, anp, pbe = plan(200.0, dry_run=False)
    assert anp["attacks"] == pbe["attacks"] == ("badnets",) and anp["budget"] == pytest.approx(70.0)
