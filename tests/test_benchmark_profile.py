"""fastpurify.benchmarks.profile: the kinds kernels are summed into, and a profile off CUDA."""
import torch

from fastpurify.benchmarks.profile import KINDS, format_profile, kernel_kind, profile_step, triton_kernel_names


def test_kernels_are_sorted_into_their_kinds():
    ours = triton_kernel_names()
    assert {"bn_stats_kernel", "bn_grad_apply_kernel", "ln_forward_kernel", "pgd_linf_step_kernel",
            "gather_augment_kernel"} <= ours
    assert not any(n.startswith("_") or not n.endswith("_kernel") for n in ours)  # device helpers are not launched
    assert kernel_kind("bn_grad_sums_kernel", ours) == KINDS[0]
    assert kernel_kind("sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc", ours) == KINDS[1]
    assert kernel_kind("void cudnn::engines_precompiled::nchwToNhwcKernel<float>", ours) == KINDS[1]
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
                       ours) == KINDS[2]
    assert kernel_kind("Memcpy DtoD (Device -> Device)", ours) == KINDS[3]
    # a helper's name inside another kernel's name does not make it ours ("col" in "col2im")
    assert kernel_kind("void at::native::col2im_kernel<float>", ours) == KINDS[2]


def test_profile_off_cuda_reports_the_wall_time_and_the_operators():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    x = torch.rand(2, 3, 8, 8)
    p = profile_step(lambda: model(x).sum().backward(), torch.device("cpu"), iterations=3, warmup=1, top=4)
    assert p["iterations"] == 3 and p["wall_ms_per_step"] > 0 and 0 < len(p["top"]) <= 4
    assert any("conv" in r["name"] for r in p["top"]) and "kernel_ms_per_step" not in p
    assert all(r["kind"] == "cpu operator" for r in p["top"])
    assert format_profile("step", p).startswith("profile of step: 3 steps")


def test_launch_counts_tell_launches_outside_graphs_from_graph_launches():
    from types import SimpleNamespace

    from fastpurify.benchmarks.profile import format_profile, launch_counts

    events = [SimpleNamespace(key=k, count=c) for k, c in
              [("cudaLaunchKernel", 30), ("cuLaunchKernelEx", 10), ("cudaMemcpyAsync", 4), ("cudaMemsetAsync", 2),
               ("cudaGraphLaunch", 10), ("aten::add", 99), ("cudaStreamSynchronize", 10)]]
    counts = launch_counts(events, iterations=10)
    assert counts == {"launches_outside_graphs_per_step": 4.6, "graph_launches_per_step": 1.0}
    text = format_profile("fast", {"iterations": 10, "wall_ms_per_step": 8.0, "kernel_ms_per_step": 7.5,
                                   "busy_share": 0.94, "kernels_per_step": 150, "by_kind": {}, "top": [], **counts})
    assert "launches outside CUDA graphs 4.6 a step, graph launches 1" in text
