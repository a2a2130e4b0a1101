"""bench/gpu/profile_graphs.py: the per-graph profile summary of onnxruntime's profiler."""
import json

from bench.gpu import profile_graphs as P


def _node(op, provider, dur, ts):
    return {"cat": "Node", "name": f"{op}_kernel_time", "dur": dur, "ts": ts, "args": {"op_name": op, "provider": provider}}


def test_summary_of_a_gpu_session_names_its_cpu_nodes_and_copies():
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 9000},  # warm-up run, left out
              _node("MatMul", cuda, 5000, 10),
              {"cat": "Session", "name": "model_run", "ts": 100, "dur": 2000},
              _node("MatMul", cuda, 300, 110), _node("MemcpyToHost", cuda, 100, 120), _node("NonZero", cpu, 50, 130),
              {"cat": "Kernel", "name": "sm90_gemm", "ts": 111, "dur": 1200},
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 4000},
              _node("MatMul", cuda, 500, 210), _node("MemcpyToHost", cuda, 100, 220), _node("NonZero", cpu, 70, 230),
              {"cat": "Kernel", "name": "sm90_gemm", "ts": 211, "dur": 1400}]
    got = P.summarise_profile(events, skip_runs=1)
    assert got["runs"] == 2 and got["model_run_p50_ms"] == 3.0
    assert got["node_ms_per_run_by_provider"] == {cpu: 0.06, cuda: 0.5}
    assert list(got["top_ops_ms_per_run"]) == ["MatMul", "MemcpyToHost", "NonZero"]
    assert got["cpu_nodes_per_run"] == {"NonZero": 1.0} and got["memcpy_nodes_per_run"] == 1.0
    assert got["cuda_kernel_ms_per_run"] == 1.3 and got["nodes_per_run"] == 3.0
    assert P.summarise_profile([], skip_runs=1) == {"runs": 0}
    assert P.graph_name(P.Path("/x/sam_encoder_2026-11-26_01-45-16_116.json")) == "sam_encoder"


def test_flops_from_the_shapes_a_node_recorded():
    def args(op, inputs, outputs):
        return {"op_name": op, "input_type_shape": [{"float": s} for s in inputs],
                "output_type_shape": [{"float": s} for s in outputs]}

    assert P.node_flops(args("MatMul", [[8, 4, 5], [5, 3]], [[8, 4, 3]])) == 2 * 8 * 4 * 3 * 5
    assert P.node_flops(args("Gemm", [[4, 5], [3, 5], [3]], [[4, 3]])) == 2 * 4 * 3 * 5  # B transposed
    assert P.node_flops(args("Gemm", [[4000, 5], [3]], [[4000, 3]])) == 2 * 4000 * 3 * 5  # B pre-packed, left out
    assert P.node_flops(args("MatMul", [[7, 40]], [[7, 9]])) == 2 * 7 * 9 * 40
    assert P.node_flops(args("FusedMatMul", [[5, 4], [5, 3]], [[4, 3]])) == 2 * 4 * 3 * 5  # A transposed
    # GroundingDINO's output projections: A transposed, B pre-packed and left out
    assert P.node_flops(args("FusedMatMul", [[1, 256, 13294]], [[1, 13294, 256]])) == 2 * 13294 * 256 * 256
    assert P.node_flops(args("Conv", [[1, 3, 10, 10], [16, 3, 3, 3]], [[1, 16, 8, 8]])) == 2 * 16 * 64 * 27
    assert P.node_flops(args("Add", [[4, 5], [4, 5]], [[4, 5]])) == 0.0


def test_cli_profiles_every_graph_of_a_tiny_pipeline(full_tiny_engine_dir, tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert P.main(["--engine-dir", str(full_tiny_engine_dir), "--device", "cpu", "--iters", "1", "--warmup", "1",
                   "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"gdino_image", "gdino_head", "sam_encoder", "sam_decoder", "saliency"} <= set(record["graphs"])
    encoder = record["graphs"]["sam_encoder"]
    assert encoder["runs"] == 1 and 0 < encoder["model_run_p50_ms"] <= record["engine_p50_ms"]["sam_encoder"] * 1.01
    assert encoder["cpu_nodes_per_run"] == {}  # a CPU session has no "fallback" to report
    assert encoder["gflop_per_run"] > 0
    assert "sam_encoder" in capsys.readouterr().out
    assert P.main(["--engine-dir", str(tmp_path / "missing"), "--device", "cpu"]) == 2
