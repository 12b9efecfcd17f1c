"""bench.py's `prof=1` reads a step's Chrome trace: the compute stream's idle time must add up, and a gap must be
counted as waiting on a copy only for the part a copy on another stream covers."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step_profile():
    spec = importlib.util.spec_from_file_location("step_profile", os.path.join(REPO, "benchmarks", "step_profile.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel(name, ts, dur, stream=7, cat="kernel"):
    return dict(cat=cat, name=name, ts=ts, dur=dur, args=dict(stream=stream))


def test_compute_stream_gaps_add_up_and_copies_beside_them_are_told_apart():
    events = [
        _kernel("gemm_a", 0, 1000),
        _kernel("add_b", 1005, 500),  # 5 us after gemm_a
        _kernel("gemm_c", 3405, 2000),  # 1,900 us after add_b, 1,500 of them beside the copy below
        _kernel("small_d", 3500, 100),  # inside gemm_c's time on the same stream: no gap
        _kernel("gemm_e", 5485, 1000),  # 80 us after gemm_c
        _kernel("Memcpy HtoD (Pinned -> Device)", 1905, 1500, stream=9, cat="gpu_memcpy"),
        _kernel("tiny_on_a_side_stream", 0, 10, stream=9),
    ]
    gaps = _step_profile().stream_gaps(events)
    assert gaps["stream"] == "7"  # the stream with the most kernel time
    assert gaps["span_ms"] == 6.5
    assert gaps["idle_ms"] == 2.0  # 5 + 1,900 + 80 us
    assert gaps["idle_ms_by_gap_size"] == {"under 10 us": 0.0, "10-100 us": 0.1, "over 100 us": 1.9}
    assert gaps["idle_ms_while_another_stream_copies"] == 1.5
    assert [name for name, _, _ in gaps["idle_ms_after_kernel"]] == ["add_b", "gemm_c", "gemm_a"]
    assert gaps["largest_gaps"][0] == (1.9, "at 1.5 ms", "add_b", "gemm_c")


def test_kernels_are_sorted_into_kinds_by_name():
    kind = _step_profile().kernel_kind
    assert kind("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT") == "matmul"
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16") == "attention"
    assert kind("triton_poi_fused__unsafe_view_add_mul_silu_11") == "compiled (triton)"
    assert kind("Memcpy DtoH (Device -> Pinned)") == "copy"
    assert kind("void kOptimizerStatic8bit2StateBlockwise<float, 0, 256, 1>") == "optimizer"


def test_matmuls_are_grouped_by_shape_with_the_rate_they_reached():
    """What tells the large products at the card's peak from the small ones below it: M x K x N, calls, GPU time and
    TFLOP/s, addmm read past its bias, other ops left out."""
    from types import SimpleNamespace

    module = _step_profile()
    averages = [SimpleNamespace(key="aten::mm", count=4, input_shapes=[[2048, 4096], [4096, 11008]],
                                device_time_total=4 * 246.0),
                SimpleNamespace(key="aten::addmm", count=2, input_shapes=[[4096, 4096], [4096, 64], [64, 4096], [], []],
                                device_time_total=2 * 10.0),
                SimpleNamespace(key="aten::add", count=9, input_shapes=[[8, 8], [8, 8]], device_time_total=50.0)]
    rows = module.matmuls_by_shape(averages)
    assert [r["mkn"] for r in rows] == ["2048x4096x11008", "4096x64x4096"]
    assert rows[0] == dict(op="mm", mkn="2048x4096x11008", calls=4, gpu_ms=0.98, tflops=751)
    assert rows[1]["tflops"] == round(2 * 4096 * 64 * 4096 / 10e-6 / 1e12)
