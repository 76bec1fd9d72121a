"""Compile fastpurify's Triton kernels for an H100 (sm_90) without a GPU, through the real launchers.

Run as a script (``python -m tests.kernels.sm90_compile [--op bn|gn|other] [--all-modes]
[--layout contiguous|channels_last]``; ``--op`` picks BatchNorm, the default, GroupNorm or the
other kernels: ANP's batch, LayerNorm, the row cosine) in a
process where TRITON_INTERPRET is unset: Triton's active driver is replaced by one that reports the
target ``("cuda", 90, 32)``, every ``JITFunction.run`` becomes a compile-only warmup
(nothing is launched), and the launchers are called on ``meta`` tensors (no memory). Each launch
is recorded with its kernel, grid and the compiled binary's registers, spills and stack, read
from the cubin with the cuobjdump that Triton ships. Prints one JSON line:
``{"cases": [...], "launches": [...], "kernels": {hash: {...}}, "seconds": ...}``. Exits with 3
when this Triton lacks the API (another version).

The compile tests run it through :func:`compile_both_layouts` and check its kernels with
:func:`assert_no_spills`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .resnet_shapes import BN_SHAPES, R50_BN

ROOT = Path(__file__).resolve().parents[2]

# GroupNorm shapes (N, C, side, num_groups, groups): PoolFormer-S12 at 224 px (GroupNorm with one
# channel group at every stage; batch 256 as ANP's two batch groups of 128, and 128 as one) and
# ResNet-50-GN at 224 px (32 channel groups at every ResNet-50 BatchNorm shape; batch 64 as one
# batch group, 128 as two).
POOLFORMER_S12 = [(64, 56), (128, 28), (320, 14), (512, 7)]  # (channels, side) of its four stages
GN_SHAPES = ([(256, c, s, 1, 2) for c, s in POOLFORMER_S12] + [(128, c, s, 1, 1) for c, s in POOLFORMER_S12]
             + [(64, c, s, 32, 1) for c, s in R50_BN] + [(128, c, s, 32, 2) for c, s in R50_BN])


def install_sm90_driver():
    """Make Triton compile for sm_90 and record instead of launching: returns the list that
    receives (kernel name, grid, compiled kernel, constexpr keyword arguments) per launch."""
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.driver import DriverBase
        from triton.runtime import jit
        jit.JITFunction.run  # noqa: B018
    except (ImportError, AttributeError):
        sys.exit(3)

    class SM90(DriverBase):
        """Reports an H100 and launches nothing."""

        @classmethod
        def is_active(cls):
            return False

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            import torch
            return torch.device("meta")

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_benchmarker(self):
            raise NotImplementedError

    triton.runtime.driver.set_active(SM90())
    launches = []
    original = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self.fn.__name__, tuple(grid), kernel, kwargs))
        return kernel

    jit.JITFunction.run = compile_only
    return launches


def resources(kernel) -> dict:
    """Registers, spills and stack of a compiled kernel, from its cubin (cuobjdump -res-usage).
    ``n_spills`` is what Triton's ``kernel.n_spills`` reads from the driver on a GPU (local
    memory / 4); ptxas also puts spills in a stack frame (``ptxas -v``: "16 bytes stack frame,
    16 bytes spill stores"), so a kernel that spills has ``n_spills`` or ``stack`` nonzero."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        text = subprocess.run([str(tool), "-res-usage", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    return dict(registers=found["REG"], n_spills=found.get("LOCAL", 0) // 4, stack=found.get("STACK", 0),
                warps=kernel.metadata.num_warps, shared=kernel.metadata.shared)


def batch_norm_launches(shapes, layouts=(False, True), dtype_name="float32"):
    """The launches of one ANP step's BatchNorm (two groups: clean and perturbed, or one) per shape
    and layout (channels_last or not): training forward, then the backward that needs dx and the
    mask and noise gradients."""
    import torch

    from fastpurify import functional as FP

    FP.backend_for = lambda *tensors: "triton"  # the meta tensors stand for CUDA ones
    dtype = getattr(torch, dtype_name)
    cases = []
    for n, c, side, groups in shapes:
        for channels_last in layouts:
            x = torch.empty(n, c, side, side, device="meta", dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            vec = lambda grad=False: torch.empty(c, device="meta").requires_grad_(grad)  # noqa: E731
            noise = torch.empty(groups, c, device="meta").requires_grad_()
            y = FP.perturbed_batch_norm(x, vec(), vec(), vec(True), noise, torch.empty_like(noise).requires_grad_(),
                                        groups=groups)
            y.backward(torch.empty_like(y))
            cases.append(dict(shape=[n, c, side, side], groups=groups, channels_last=channels_last))
    return cases


def other_modes(layouts=(False, True)):
    """The branches the ANP step does not take, once per layout: eval forward and a dx-only
    backward (PGD through a frozen model), running statistics updated, weight and bias
    gradients, a mask-only backward (x needs no gradient), the folded ReLU (training with mask
    and noise gradients; eval, dx only), the folded residual add and ReLU (with every gradient;
    the residual's alone), float16 and bfloat16, and a tensor of 2**31 values (int64 offsets)."""
    import torch

    from fastpurify import functional as FP

    FP.backend_for = lambda *tensors: "triton"
    for channels_last in layouts:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.empty(64, 256, 14, 14, device="meta", dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            p = [torch.empty(256, device="meta").requires_grad_() for _ in range(3)]
            stats = [torch.empty(256, device="meta") for _ in range(2)]
            y = FP.perturbed_batch_norm(x.requires_grad_(), *p, *stats, training=True)  # running stats, dw, db
            y.backward(torch.empty_like(y))
            x = x.detach().requires_grad_()
            y = FP.perturbed_batch_norm(x, p[0].detach(), p[1].detach(), p[2].detach(), *[None, None], *stats,
                                        training=False)
            y.backward(torch.empty_like(y))  # eval, dx only
            y = FP.perturbed_batch_norm(x.detach(), p[0].detach(), p[1].detach(), p[2], *[None, None], *stats,
                                        training=False)
            y.backward(torch.empty_like(y))  # eval, mask only
            y = FP.perturbed_batch_norm(x.detach(), p[0].detach(), p[1].detach(), p[2], groups=2)
            y.backward(torch.empty_like(y))  # training, mask only
            y = FP.perturbed_batch_norm(x.detach().requires_grad_(), p[0].detach(), p[1].detach(), p[2],
                                        torch.empty(2, 256, device="meta").requires_grad_(), groups=2, relu=True)
            y.backward(torch.empty_like(y))  # ANP's step with the ReLU folded in (fastpurify.fusion)
            y = FP.perturbed_batch_norm(x.detach().requires_grad_(), p[0].detach(), p[1].detach(), p[2].detach(),
                                        *[None, None], *stats, training=False, relu=True)
            y.backward(torch.empty_like(y))  # eval with the ReLU, dx only
            r = torch.empty_like(x).requires_grad_()
            y = FP.perturbed_batch_norm(x.detach().requires_grad_(), p[0].detach(), p[1].detach(), p[2],
                                        torch.empty(2, 256, device="meta").requires_grad_(), groups=2, relu=True,
                                        residual=r)
            y.backward(torch.empty_like(y))  # ANP's step at a block's end: the residual add and ReLU folded in
            y = FP.perturbed_batch_norm(x.detach(), p[0].detach(), p[1].detach(), p[2].detach(), groups=2, relu=True,
                                        residual=r)
            y.backward(torch.empty_like(y))  # the residual's gradient alone
        x = torch.empty(512, 64, 256, 256, device="meta")  # 2**31 values: int64 offsets
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        p = [torch.empty(64, device="meta").requires_grad_() for _ in range(3)]
        y = FP.perturbed_batch_norm(x.requires_grad_(), p[0].detach(), p[1].detach(), p[2], groups=2)
        y.backward(torch.empty_like(y))


def group_norm_launches(shapes, layouts=(False, True)):
    """The launches of one ANP step's GroupNorm per shape and layout: forward, then the backward
    that needs dx and the mask and noise gradients (weights frozen)."""
    import torch

    from fastpurify import functional as FP

    FP.backend_for = lambda *tensors: "triton"  # the meta tensors stand for CUDA ones
    cases = []
    for n, c, side, num_groups, groups in shapes:
        for channels_last in layouts:
            x = torch.empty(n, c, side, side, device="meta")
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            noise = torch.empty(groups, c, device="meta").requires_grad_()
            frozen = [torch.empty(c, device="meta") for _ in range(2)]
            mask = torch.empty(c, device="meta").requires_grad_()
            noise_bias = torch.empty_like(noise).requires_grad_()
            y = FP.perturbed_group_norm(x.requires_grad_(), *frozen, mask, noise, noise_bias, num_groups=num_groups,
                                        groups=groups)
            y.backward(torch.empty_like(y))
            cases.append(dict(shape=[n, c, side, side], num_groups=num_groups, groups=groups,
                              channels_last=channels_last))
    return cases


def group_norm_other_modes(layouts=(False, True)):
    """The GroupNorm branches the ANP step does not take, once per layout: trainable weight and
    bias, no affine at all, a dx-only backward (PGD through a frozen model), a parameters-only
    backward (x needs no gradient), bfloat16 (float16 takes the same 2-byte plans and paths; left
    out to keep the compile short), a 2-D (N, C) input, and a tensor of 2**31 values (int64 offsets)."""
    import torch

    from fastpurify import functional as FP

    FP.backend_for = lambda *tensors: "triton"
    meta = lambda *shape, grad=False: torch.empty(*shape, device="meta").requires_grad_(grad)  # noqa: E731
    for channels_last in layouts:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.empty(64, 256, 14, 14, device="meta", dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = FP.perturbed_group_norm(x.requires_grad_(), meta(256, grad=True), meta(256, grad=True),
                                        meta(256, grad=True), num_groups=32)  # dw, db
            y.backward(torch.empty_like(y))
            y = FP.perturbed_group_norm(x, None, None, meta(256), num_groups=32)  # no affine, dx only
            y.backward(torch.empty_like(y))
            y = FP.perturbed_group_norm(x.detach(), meta(256), meta(256), meta(256, grad=True), meta(2, 256, grad=True),
                                        num_groups=1, groups=2)  # x needs no gradient
            y.backward(torch.empty_like(y))
        x = torch.empty(512, 64, 256, 256, device="meta")  # 2**31 values: int64 offsets
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = FP.perturbed_group_norm(x.requires_grad_(), meta(64), meta(64), meta(64, grad=True), meta(2, 64, grad=True),
                                    num_groups=1, groups=2)
        y.backward(torch.empty_like(y))
    x = torch.empty(256, 768, device="meta").requires_grad_()  # (N, C)
    y = FP.perturbed_group_norm(x, meta(768), meta(768), meta(768, grad=True), meta(2, 768, grad=True), num_groups=12,
                                groups=2)
    y.backward(torch.empty_like(y))


def augment_launches(layouts=(False, True)):
    """ANP's batch at the CIFAR shapes: 128 of 500 images gathered, cropped and flipped into the
    engine's buffer (float32, per layout), and without augmentation into a float64 one."""
    import torch

    from fastpurify.kernels.augment import gather_augment

    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    src, labels = meta(500, 3, 32, 32), meta(500, dtype=torch.long)
    index, offsets, flip_u = meta(128, dtype=torch.long), meta(128, 2, dtype=torch.long), meta(128)
    cases = []
    for channels_last in layouts:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for dtype, augmented in ((torch.float32, True), (torch.float64, False)):
            dst = meta(128, 3, 32, 32, dtype=dtype).contiguous(memory_format=fmt)
            gather_augment(src, labels, index, offsets if augmented else None, flip_u if augmented else None,
                           4 if augmented else 0, dst, meta(128, dtype=torch.long))
            cases.append(dict(channels_last=channels_last, dtype=str(dtype), augmented=augmented))
    return cases


def other_launches(layouts=(False, True)):
    """The kernels outside the BatchNorm and GroupNorm suites, through their real launchers: ANP's
    batch (:func:`augment_launches`); LayerNorm forward and backward (mask and noise gradients,
    two groups) on ViT-B/16's tokens (128, 197, 768) and, as LayerNorm2d on NCHW (contiguous
    layout) or on NHWC (channels_last), at ConvNeXt-T's stages (batch 128, two groups); PBE's row
    cosine on 2,500 and 50,000 rows of 10 logits and 4,096 of 1,000."""
    import torch

    from fastpurify import functional as FP

    FP.backend_for = lambda *tensors: "triton"
    cases = augment_launches(layouts)
    meta = lambda *shape, grad=False: torch.empty(*shape, device="meta").requires_grad_(grad)  # noqa: E731

    def layer_norm(x, channel_dim):
        c = x.shape[channel_dim]
        y = FP.perturbed_layer_norm(x.requires_grad_(), meta(c), meta(c), meta(c, grad=True), meta(2, c, grad=True),
                                    meta(2, c, grad=True), groups=2, channel_dim=channel_dim)
        y.backward(torch.empty_like(y))

    for channels_last in layouts:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for c, side in ((96, 56), (192, 28), (384, 14), (768, 7)):
            layer_norm(meta(128, c, side, side).contiguous(memory_format=fmt), 1)
            cases.append(dict(op="layernorm2d", shape=[128, c, side, side], channels_last=channels_last))
        if channels_last:  # once: the tokens have no layouts
            layer_norm(meta(128, 197, 768), -1)
            for n, k in ((2500, 10), (50000, 10), (4096, 1000)):
                FP.logits_cosine(meta(n, k), meta(n, k))
    return cases


def compile_both_layouts(*options) -> list[dict]:
    """For the compile tests: this module run as a script with ``options`` in two processes at once
    (contiguous and channels_last: disjoint variants), without TRITON_INTERPRET; their JSON
    reports. Skips the test when this Triton cannot compile ahead of time (exit status 3)."""
    import os

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [subprocess.Popen([sys.executable, "-m", "tests.kernels.sm90_compile", *options, "--layout", layout],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for layout in ("contiguous", "channels_last")]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=900)
        if run.returncode == 3:
            pytest.skip(f"this Triton cannot compile ahead of time here: {err.strip()[-500:]}")
        assert run.returncode == 0, f"compiling for sm_90 failed:\n{err[-6000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def assert_no_spills(compiled: list[dict], names: set[str]) -> None:
    """Every kernel of ``names``, and only those, compiled; none spills registers (local memory or
    a stack frame), none uses more than 128 registers a thread (4 programs an SM)."""
    kernels = {h: k for run in compiled for h, k in run["kernels"].items()}
    assert {k["name"] for k in kernels.values()} == names
    spilled = [k for k in kernels.values() if k["n_spills"] or k["stack"]]
    assert not spilled, f"register spills (local memory or a stack frame): {spilled}"
    assert all(k["registers"] <= 128 for k in kernels.values()), \
        f"at most 128 registers (4 programs an SM): {[k for k in kernels.values() if k['registers'] > 128]}"


def main() -> None:
    start = time.perf_counter()
    layout = sys.argv[sys.argv.index("--layout") + 1] if "--layout" in sys.argv else None
    layouts = {None: (False, True), "contiguous": (False,), "channels_last": (True,)}[layout]
    op = sys.argv[sys.argv.index("--op") + 1] if "--op" in sys.argv else "bn"
    launches = install_sm90_driver()
    cases = {"bn": lambda: batch_norm_launches(BN_SHAPES, layouts), "gn": lambda: group_norm_launches(GN_SHAPES, layouts),
             "other": lambda: other_launches(layouts)}[op]()
    anp_launches = len(launches)
    if "--all-modes" in sys.argv:
        (other_modes if op == "bn" else group_norm_other_modes)(layouts)
    kernels = {}
    records = []
    for i, (name, grid, kernel, kwargs) in enumerate(launches):
        if kernel.hash not in kernels:
            kernels[kernel.hash] = dict(name=name, **resources(kernel))
        # every launch reads or writes the activations (or, GroupNorm's per-group sums of its
        # per-sample partials, is sized to fill the GPU like them), except the per-channel gradients alone
        touches = (name not in ("bn_grad_apply_kernel", "gn_grad_apply_kernel") or bool(kwargs.get("NEED_DX"))
                   or bool(kwargs.get("NEED_DR")))
        records.append(dict(kernel=name, hash=kernel.hash, grid=list(grid), anp=i < anp_launches,
                            touches_activations=touches))
    print(json.dumps(dict(cases=cases, launches=records, kernels=kernels, seconds=time.perf_counter() - start)))


if __name__ == "__main__":
    main()
