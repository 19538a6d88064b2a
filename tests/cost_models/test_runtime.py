"""Runtime modes: which kernels run and which pay a CPU launch (cost_models/runtime.py)."""

from __future__ import annotations

import pytest

from cost_models.devices import lookup
from cost_models.layer_cost import layer_cost
from cost_models.roofline import TracedShape, class_times, efficiencies_for, layer_work
from cost_models.runtime import default_runtime, kernels, prefill_runtime
from planner.cluster import Cluster, SpecError, Workload


def _decode(runtime):
    return Workload(batch_size=1, seq_len=8, dtype="bfloat16", phase="decode", context_len=64,
                    runtime=runtime)


def test_cudagraphs_is_compiled_less_exactly_its_launch_overhead(llama_tiny):
    block, spec = llama_tiny.layers[1], lookup("H100")
    traced = TracedShape(1, 8, 4)
    cost = {r: layer_cost(block, llama_tiny.arch, 1, _decode(r), spec, 1, traced=traced)
            for r in ("eager", "compiled", "cudagraphs")}
    work = layer_work(block, llama_tiny.arch, 1, _decode("compiled"), 1, traced)
    launches = sum(k.launches for k in kernels(work, "compiled").values())
    assert launches == 7 + 1 + 9  # 7 matmuls, attention, one fused kernel per gap
    assert cost["compiled"].compute_s - cost["cudagraphs"].compute_s == pytest.approx(
        launches * spec.launch_overhead_s, rel=1e-9)
    eager_launches = sum(w.count for c, w in work.items() if c != "view")
    assert cost["eager"].compute_s > cost["compiled"].compute_s
    assert cost["eager"].compute_s - cost["compiled"].compute_s > (
        (eager_launches - launches) * spec.launch_overhead_s)  # plus the fused kernels' time


def test_eager_on_the_cpu_is_the_calibrated_formula_unchanged(llama_tiny):
    eff = efficiencies_for(lookup("cpu"))
    assert eff.kernel_s == 0.0
    work = layer_work(llama_tiny.layers[1], llama_tiny.arch, 1,
                      Workload(batch_size=1, seq_len=8, dtype="float32"), 1)
    for c, t in class_times(work, eff, "float32").items():
        e, w = eff.for_class(c), work[c]
        peak = eff.peak_flops["float32"]
        assert t == w.count * e.overhead_s + max(w.flops / (peak * e.compute),
                                                  w.bytes / (eff.memory_bandwidth * e.memory))


def test_defaults_per_device_and_phase_and_refusals():
    gpu, cpu = Cluster.parse("8xH100"), Cluster.parse("2xcpu")
    assert default_runtime("nccl", "decode") == "cudagraphs"
    assert default_runtime("nccl", "prefill") == "eager"
    assert default_runtime("gloo", "decode") == "eager"
    assert prefill_runtime("cudagraphs") == "compiled"
    assert Workload(phase="decode").with_runtime(gpu).runtime == "cudagraphs"
    assert Workload(phase="decode").with_runtime(cpu).runtime == "eager"
    assert Workload(runtime="compiled").with_runtime(gpu).runtime == "compiled"
    with pytest.raises(SpecError, match="needs GPUs"):
        Workload(runtime="cudagraphs").with_runtime(cpu)
    with pytest.raises(SpecError, match="runtime"):
        Workload(runtime="jit")
