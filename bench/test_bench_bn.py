"""The side-by-side BatchNorm runner behind `fastpurify bench bn` (fastpurify.benchmarks.batch_norm):
its smoke sizes on CPU (fastpurify's PyTorch path) through the runner and the command, every field
of the JSON, the fused-vs-composition cross-check, the deadline, a failing torch.compile and bad
input. On a GPU the runner's smoke sizes also run on CUDA (the Triton kernels)."""

import json
import time

import pytest
import torch

from fastpurify.benchmarks import batch_norm as bn
from fastpurify.cli import main
from fastpurify.validation import InputError

CUDA = torch.cuda.is_available()
SMOKE = dict(shapes="smoke", warmup=1, repeats=3, progress=None)
# compile is left out (on CPU only when named: a compile takes seconds a shape), copy is forward only
EXPECTED = {"forward": ["fused", "composition", "cudnn", "copy"], "forward+backward": ["fused", "composition", "cudnn"]}

pytestmark = pytest.mark.usefixtures("cpu_path")  # bench/conftest.py: one CPU thread


def _cases():
    return [(tuple(s), layout, mode) for s in bn.SHAPES["smoke"] for layout in bn.LAYOUTS for mode in bn.MODES]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))])
def test_runner_smoke_every_field(device):
    seen = []
    result = bn.run_bn_benchmark(device=device, variants=["fused", "composition", "cudnn", "copy"],
                                 on_row=lambda row, partial: seen.append((row, len(partial["rows"]))), **SMOKE)
    assert result["benchmark"] == "bn" and result["skipped"] == []
    assert {"date", "torch", "triton", "device", "device_type"} <= set(result["environment"])
    s = result["settings"]
    assert s["fused_backend"] == ("triton" if device == "cuda" else "torch")
    assert s["shapes"] == [list(x) for x in bn.SHAPES["smoke"]] and s["groups"] == 2 and s["repeats"] == 3
    assert s["layouts"] == ["nchw", "nhwc"] and s["modes"] == ["forward", "forward+backward"]
    assert s["dtype"] == "float32" and s["tensors_moved"] == {"forward": 2, "forward+backward": 5}
    assert [(tuple(r["shape"]), r["layout"], r["mode"]) for r in result["rows"]] == _cases()
    assert [n for _, n in seen] == list(range(1, len(_cases()) + 1))  # on_row after each row, the result so far
    tol = 1e-4 if device == "cpu" else 1e-3
    for row in result["rows"]:
        numel = torch.Size(row["shape"]).numel()
        assert row["bytes"] == s["tensors_moved"][row["mode"]] * numel * 4
        assert [v["name"] for v in row["variants"]] == EXPECTED[row["mode"]]
        for v in row["variants"]:
            assert 0 < v["min_ms"] <= v["median_ms"] <= v["max_ms"] and len(v["block_ms"]) == 3
            assert v["GB_per_second"] == pytest.approx(row["bytes"] / 1e6 / v["median_ms"], rel=0.03, abs=0.01)
            composed = next(d for d in row["variants"] if d["name"] == "composition")
            assert v["ratio_vs_reference"] == pytest.approx(composed["median_ms"] / v["median_ms"], rel=0.01, abs=2e-3)
            assert v["ratio_vs_compile"] is None and "compile_seconds" not in v
        fused = row["variants"][0]
        sp = row["fused_speedup"]
        assert sp["compile"] is None and sp["composition"] > 0 and sp["cudnn"] > 0
        cudnn = row["variants"][2]["median_ms"]
        assert sp["cudnn"] == pytest.approx(cudnn / fused["median_ms"], rel=0.01, abs=2e-3)
        assert row["fused_fraction_of_copy_bandwidth"] > 0
        check = row["check_max_abs_diff"]
        assert set(check) == {"y", "dx", "dmask", "dnoise", "dnoise_bias"}
        assert check["y"] < tol and check["dx"] < tol
        assert max(check["dmask"], check["dnoise"], check["dnoise_bias"]) < 100 * tol  # sums over N·H·W values
    table = bn.format_table(result)
    assert "8x16x6x6" in table and "nhwc" in table and "fwd+bwd" in table and "skipped" not in table
    json.dumps(result)


def test_deadline_passed_skips_every_measurement():
    calls = []
    result = bn.run_bn_benchmark(device="cpu", deadline=time.monotonic() - 1, on_row=lambda *a: calls.append(a),
                                 **SMOKE)
    assert result["rows"] == [] and calls == []
    expected = {(shape, layout, mode, v) for shape, layout, mode in _cases() for v in EXPECTED[mode]}
    got = {(tuple(e["shape"]), e["layout"], e["mode"], e["name"]) for e in result["skipped"]}
    assert got == expected and len(result["skipped"]) == len(expected)
    assert {e["reason"] for e in result["skipped"]} == {"budget"}
    assert "budget" in bn.format_table(result)


def test_compile_skipped_when_it_fails_or_would_pass_the_deadline(monkeypatch):
    tried = []

    def broken(*args, **kwargs):
        tried.append(kwargs)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    one = dict(SMOKE, shapes="8x8x3x3", layouts="nchw")
    result = bn.run_bn_benchmark(device="cpu", variants=["fused", "compile"], **one)
    assert [[v["name"] for v in r["variants"]] for r in result["rows"]] == [["fused"], ["fused"]]
    assert [(e["name"], e["mode"]) for e in result["skipped"]] == [("compile", "forward"),
                                                                   ("compile", "forward+backward")]
    assert all("no compiler here" in e["reason"] for e in result["skipped"])
    assert tried == [{"dynamic": False}]  # the failure is remembered, not retried per row

    # A compile expected to take longer than the time left is skipped; the other variants run.
    result = bn.run_bn_benchmark(device="cpu", variants=["fused", "compile"], deadline=time.monotonic() + 60,
                                 compile_estimate_s=1e6, **one)
    assert len(result["rows"]) == 2 and [e["reason"] for e in result["skipped"]] == ["budget", "budget"]
    assert len(tried) == 1 and result["compile_seconds_total"] == 0


def test_bench_bn_smoke_writes_json(tmp_path, capsys):
    out = tmp_path / "bn.json"
    assert main(["bench", "bn", "--smoke", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "bn" and result["settings"]["fused_backend"] == "torch"
    assert len(result["rows"]) == len(_cases()) and result["skipped"] == []
    assert result["environment"]["threads"] == 1
    assert all(r["check_max_abs_diff"]["y"] < 1e-4 for r in result["rows"])
    printed = capsys.readouterr().out
    assert "fused GB/s" in printed and f"wrote {out}" in printed


@pytest.mark.parametrize("kw, message", [
    (dict(variants=["fused", "cuDNN"]), "unknown benchmark variant"),
    (dict(layouts="nchw,nhcw"), "unknown layout"),
    (dict(modes=["backward"]), "unknown mode"),
    (dict(shapes="8x16x6"), "malformed shape"),
    (dict(shapes="8x16xsixx6"), "malformed shape"),
    (dict(shapes="9x16x6x6"), "not divisible by groups"),
    (dict(shapes=[(8, 16, 6, 6)], groups=3), "not divisible by groups"),
    (dict(shapes=[(8, 16, 1, 1)], groups=8), "one value per channel"),
    (dict(groups=0), "groups must be a positive integer"),
    (dict(repeats=0), "repeats must be a positive integer"),
])
def test_bad_input(kw, message):
    with pytest.raises(InputError, match=message):
        bn.run_bn_benchmark(device="cpu", **dict(SMOKE, **kw))


def test_cli_bad_shapes(tmp_path, capsys):
    assert main(["bench", "bn", "--smoke", "--device", "cpu", "--shapes", "256x64", "--out", str(tmp_path / "x")]) == 2
    assert "malformed shape '256x64'" in capsys.readouterr().err
