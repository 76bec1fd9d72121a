"""The LayerNorm kernels called directly, outputs poisoned with NaN before each launch so that an
element the kernels fail to write is caught; checked against the float64 formulas. Each case runs
with the launcher's own tiles and with forced small ones that reach the other paths: features in
several chunks, and several row blocks per backward program."""

import os
import subprocess
import sys

import pytest
import torch

from fastpurify.kernels import layer_norm as LN
from fastpurify.kernels.layer_norm import ln_backward, ln_forward, tile_shape

from ..devices import TEST_DEVICE, cpu_only, on_device
from ..formulas import layer_norm, layer_norm_grads, random_bn_params

CASES = [  # (shape, channel_dim, groups, channels_last)
    ((3, 7), -1, 1, False),           # 2-D (N, C): S = 1
    ((4, 5, 13), -1, 2, False),       # tokens (N, T, C)
    ((2, 3, 3, 17), -1, 2, False),    # Swin's NHWC, normalised over the last axis
    ((4, 17, 5, 3), 1, 2, False),     # ConvNeXt's LayerNorm2d on NCHW: features strided by H*W
    ((4, 17, 5, 3), 1, 2, True),      # ... on channels_last: features contiguous
    ((6, 5, 2, 3), 1, 3, False),
    ((4, 1, 3, 2), 1, 2, False),      # one feature: xhat = 0, y = shift
    ((2, 300, 2, 2), 1, 2, False),    # two chunks of the interpreter's 256 features, strided
    ((4, 2, 1000), -1, 2, False),     # C = 1000: four chunks
]
TILES = [None, (8, 8), (4, 32)]  # the launcher's; features in chunks of 8; 4-row blocks, whole rows of <= 32
# every case with every tile, except the wide ones (hundreds of chunks through the interpreter)
CASE_TILES = [(*case, tile) for case in CASES for tile in (TILES if case[0][case[1]] < 300 else [None])]
ids = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731


def as_ncs(t, channel_dim):
    """The (N, C, S) view the launchers take: features at ``channel_dim`` (1 or -1), positions merged."""
    n, c = t.shape[0], t.shape[channel_dim]
    return t.view(n, c, -1) if channel_dim == 1 else t.view(n, -1, c).transpose(1, 2)


def make(shape, channel_dim, groups, channels_last, noisy=True, affine=True, seed=0):
    x = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = random_bn_params(shape[channel_dim], groups, seed)
    if not noisy:
        p["noise"] = p["noise_bias"] = None
    if not affine:
        p["weight"] = p["bias"] = None
    return x, p


def launch_forward(x, p, channel_dim, groups, tile):
    x3 = as_ncs(x, channel_dim)
    y3 = torch.full_like(x3, float("nan"))
    rows = x3.shape[0] * x3.shape[2]
    mean = torch.full((rows,), float("nan"), device=TEST_DEVICE)
    rstd = torch.full((rows,), float("nan"), device=TEST_DEVICE)
    ln_forward(x3, y3, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], mean, rstd, groups=groups,
               eps=1e-5, tile=tile)
    return x3, y3, mean, rstd


@pytest.mark.parametrize("noisy", [True, False], ids=["noisy", "clean"])
@pytest.mark.parametrize("shape, channel_dim, groups, channels_last, tile", CASE_TILES, ids=ids)
def test_forward_writes_every_output(shape, channel_dim, groups, channels_last, noisy, tile):
    x, p = make(shape, channel_dim, groups, channels_last, noisy)
    x3, y3, mean, rstd = launch_forward(x, p, channel_dim, groups, tile)
    for name, t in (("y", y3), ("mean", mean), ("rstd", rstd)):
        assert not torch.isnan(t).any(), f"{name} has unwritten elements"
    ref = layer_norm(x, **p, groups=groups, channel_dim=channel_dim)
    assert torch.allclose(y3.double(), as_ncs(ref, channel_dim), atol=2e-5, rtol=1e-5)
    rows = x3.double().transpose(1, 2).reshape(-1, x3.shape[1])  # (N * S, C), row r = n * S + s
    assert torch.allclose(mean.double(), rows.mean(1), atol=1e-6)
    assert torch.allclose(rstd.double(), 1 / torch.sqrt(rows.var(1, unbiased=False) + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("noisy, affine", [(True, True), (False, True), (True, False)],
                         ids=["noisy", "clean", "no-affine"])
@pytest.mark.parametrize("shape, channel_dim, groups, channels_last, tile", CASE_TILES, ids=ids)
def test_backward_writes_every_output(shape, channel_dim, groups, channels_last, noisy, affine, tile):
    x, p = make(shape, channel_dim, groups, channels_last, noisy, affine)
    x3, _, mean, rstd = launch_forward(x, p, channel_dim, groups, tile)
    dy = on_device(torch.randn(shape, generator=torch.Generator().manual_seed(9)))
    nan = lambda t: None if t is None else torch.full_like(t, float("nan"))  # noqa: E731
    out = dict(x=nan(x3), mask=nan(p["mask"]), noise=nan(p["noise"]), noise_bias=nan(p["noise_bias"]),
               weight=nan(p["weight"]), bias=nan(p["bias"]))
    ln_backward(x3, as_ncs(dy, channel_dim), out["x"], p["weight"], p["bias"], p["mask"], p["noise"],
                p["noise_bias"], mean, rstd, groups=groups, dmask=out["mask"], dnoise=out["noise"],
                dnoise_bias=out["noise_bias"], dweight=out["weight"], dbias=out["bias"], tile=tile)
    ref = layer_norm_grads(x, p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], dy, groups=groups,
                           channel_dim=channel_dim)
    ref["x"] = as_ncs(ref["x"], channel_dim)
    assert set(ref) == {k for k, v in out.items() if v is not None}
    for k, want in ref.items():
        got = out[k]
        assert not torch.isnan(got).any(), f"d{k} has unwritten elements"
        scale = want.abs().max().item() + 1.0
        assert torch.allclose(got.double(), want, atol=5e-5 * scale, rtol=1e-4), k


@pytest.mark.parametrize("tile", [None, (8, 8)], ids=ids)
def test_backward_skips_what_is_not_asked(tile):
    x, p = make((4, 6, 3, 2), 1, 2, False)
    x3, _, mean, rstd = launch_forward(x, p, 1, 2, tile)
    dy3 = on_device(torch.randn(x3.shape))
    args = (p["weight"], p["bias"], p["mask"], p["noise"], p["noise_bias"], mean, rstd)
    dx_only = torch.full_like(x3, float("nan"))
    ln_backward(x3, dy3, dx_only, *args, groups=2, tile=tile)  # input gradient only (PGD through a frozen model)
    dmask, dx = torch.full_like(p["mask"], float("nan")), torch.full_like(x3, float("nan"))
    ln_backward(x3, dy3, None, *args, groups=2, dmask=dmask, tile=tile)  # mask gradient only
    ln_backward(x3, dy3, dx, *args, groups=2, dmask=torch.empty_like(dmask), tile=tile)
    assert not torch.isnan(dx_only).any() and not torch.isnan(dmask).any()
    assert torch.equal(dx_only, dx)


def test_float64_is_reduced_in_float64():
    x, p = make((4, 5, 13), -1, 2, False)
    x, p = x.double(), {k: v.double() for k, v in p.items()}
    _, y3, _, _ = launch_forward(x, p, -1, 2, None)
    assert y3.dtype == torch.float64
    assert torch.allclose(y3, as_ncs(layer_norm(x, **p, groups=2), -1), atol=1e-12, rtol=1e-12)


def test_tiles_follow_the_memory_layout(monkeypatch):
    monkeypatch.setattr(LN, "interpreting", lambda: False)  # the GPU configs
    tokens = as_ncs(torch.empty(2, 197, 768, device=TEST_DEVICE), -1)
    nchw = as_ncs(torch.empty(2, 768, 7, 7, device=TEST_DEVICE), 1)
    nhwc = as_ncs(torch.empty(2, 96, 56, 56, device=TEST_DEVICE).contiguous(memory_format=torch.channels_last), 1)
    assert tile_shape(tokens, 197, 768)[:2] == (4, 1024)  # a whole row of features, read along them
    assert tile_shape(nhwc, 56 * 56, 96)[:2] == (32, 128)
    assert tile_shape(nchw, 49, 768)[:2] == (16, 256)  # 16 contiguous positions; the features in chunks
    assert tile_shape(as_ncs(torch.empty(2, 96, 56, 56, device=TEST_DEVICE), 1), 56 * 56, 96)[:2] == (32, 128)
    monkeypatch.setattr(LN, "interpreting", lambda: True)
    assert tile_shape(tokens, 197, 768)[1] == 256  # one config under the interpreter


COMPILE_FOR_A_GPU = """
import inspect, sys
import triton, triton.language as tl
from fastpurify.kernels import layer_norm as LN
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)

def compile_for_sm90(fn, consts, warps):
    names = list(inspect.signature(fn.fn).parameters)
    pointer = lambda n: n.isupper() and n not in ("C", "S", "G", "P")  # X, MEAN, PART_A...; the rest are sizes
    types = {n: "constexpr" if n in consts else "fp32" if n == "eps" else "*fp32" if pointer(n) else "i32"
             for n in names}
    try:
        source = ASTSource(fn, types, {(names.index(n),): v for n, v in consts.items()})
    except TypeError:  # another Triton's internal API
        sys.exit(3)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

# the tiles of tile_shape: tokens (a whole row), LayerNorm2d on NCHW (one tile; chunks)
for one_tile, block_r, block_c in ((True, 4, 1024), (True, 32, 128), (False, 16, 256)):
    for on in (True, False):
        tile = dict(ACC=tl.float32, ONE_TILE=one_tile, BLOCK_R=block_r, BLOCK_C=block_c)
        compile_for_sm90(LN.ln_forward_kernel, dict(HAS_W=on, HAS_B=on, HAS_NOISE=on, HAS_NOISE_B=on, **tile), 8)
        compile_for_sm90(LN.ln_backward_kernel, dict(HAS_W=on, HAS_NOISE=on, NEED_DX=True, NEED_SUMS=on, **tile), 8)
        compile_for_sm90(LN.ln_param_grads_kernel, dict(
            HAS_W=on, HAS_B=on, HAS_NOISE=on, HAS_NOISE_B=on, NEED_DMASK=True, NEED_DNOISE=on, NEED_DNOISE_B=on,
            NEED_DW=on, NEED_DB=on, ACC=tl.float32, BLOCK_P=32, BLOCK_C=LN.PARAM_GRAD_FEATURES), 4)
print("compiled")
"""


@cpu_only
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_a_gpu():
    """The interpreter runs code that the compiler rejects (a loop-carried variable whose type
    changes, say): compile every kernel, both tile paths, for an sm_90 target in a fresh process
    without the interpreter (no GPU needed: Triton ships its own ptxas)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_A_GPU], env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode == 3:
        pytest.skip("this Triton has another ahead-of-time compile API")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
