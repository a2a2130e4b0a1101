"""`python -m bench.gpu` (bench/gpu/): the plan, the budget, the skips and the decisions, with
stand-in processes (default suite); `export --reuse-from`, which its ViT-H export uses; and, slow
(`pytest -m slow`), the whole run rehearsed on this CPU with tiny engines."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu import plan as P
from bench.gpu import run as R

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------- the plan and the budget


def test_the_plan_runs_the_steps_in_the_issue_order():
    ids = [s.id for s in P.make_plan(P.FULL_SIZE, "cuda")]
    assert ids[:4] == ["00-export-vit_b", "00-export-vit_h", "01-deformable", "02-sam-attention"]
    assert ids[4] == "03-vit_b-per-caption-cuda-graphs" and ids[-1] == "07-reference"
    assert ids.index("04-vit_b-compare") < ids.index("05-vit_b-kernels") < ids.index("06-vit_h-per-caption-cuda-graphs")
    assert [s.id for s in P.make_plan(P.FULL_SIZE, "cuda", export=False)][:2] == ["01-deformable", "02-sam-attention"]
    vit_h = [s for s in P.make_plan(P.FULL_SIZE, "cuda") if s.variant == "vit_h" and s.kind != "export"]
    assert vit_h and all(s.reserve_s == P.FULL_SIZE.reference for s in vit_h)  # where time allows: the reference first
    joined = [c for c in P.configurations("cuda") if c.joined]
    assert [c.name for c in joined] == ["joined-all-on"] and joined[0].settings == {
        "cuda_graphs": True, "overlap": True, "device_canvas": True, "cuda_tf32": "head"}
    # a CPU rehearsal forces the GPU paths onto the CPU provider, so CUDA graphs (fixed buffers) are valid there
    assert all(c.settings["io_binding"] and c.settings["static_shapes"] for c in P.configurations("cpu"))
    assert P.faithful("cuda").settings == {} and P.faithful("cuda").options == {}


def test_the_default_budget_takes_vit_b_and_the_reference_and_ends_inside_ten_minutes():
    rows = {r["step"]: r for r in P.timeline(P.make_plan(P.FULL_SIZE, "cuda"), R.DEFAULT_BUDGET_S)}
    for step in ("00-export-vit_b", "01-deformable", "03-vit_b-per-caption-cuda-graphs", "04-vit_b-compare",
                 "05-vit_b-kernels", "06-vit_h-per-caption-cuda-graphs", "07-reference"):
        assert rows[step]["expected"] == "runs", rows[step]
    assert rows["06-vit_h-kernels"]["expected"].startswith("skipped")
    assert max(r["end_s"] for r in rows.values() if r["expected"] == "runs") <= R.DEFAULT_BUDGET_S < 600
    assert rows["00-export-vit_h"]["start_s"] == rows["02-sam-attention"]["end_s"]  # after step 2's pick
    text = P.format_plan(P.make_plan(P.FULL_SIZE, "cuda"), 300)
    assert "07-reference" in text and "skipped (over the budget)" in text


def test_the_budget_skips_what_does_not_fit_and_keeps_the_reference_its_time():
    now = [0.0]
    budget = P.Budget(100, clock=lambda: now[0])
    step = P.Step("x", "latency", 30)
    held = P.Step("y", "latency", 30, reserve_s=50)
    assert budget.skip_reason(step) is None and budget.skip_reason(held) is None
    now[0] = 60
    assert budget.skip_reason(step) is None
    assert "leave ~50 s for the reference, 40 s of 100 s left" in budget.skip_reason(held)
    assert budget.timeout_for(step) == 40  # never past the budget
    now[0] = 0
    assert budget.timeout_for(step) == 90 and budget.timeout_for(held) == 50  # 3x its estimate; less the reserve
    now[0] = 120
    assert "0 s of 100 s left" in budget.skip_reason(step) and budget.timeout_for(step) == 1.0


# ---------------------------------------------------------------------------------- the decisions


def _deformable(fused=None, per_point=2.0, diff=1e-7, check=None, cpu_kernel=None):
    forms = {"per_point": {"p50_ms": per_point, "max_abs_diff": 0.0}, "per_level": {"p50_ms": 3.0, "max_abs_diff": 1e-7}}
    if fused is not None:
        forms["fused"] = {"p50_ms": fused, "max_abs_diff": diff, "cuda_graph": "captured"}
    case = {"forms": forms, "precision": "fp32", "output_scale": 0.5, "kernel_check": check or {"fallback": None}}
    if cpu_kernel is not None:
        case["cuda_vs_cpu_kernel_max_abs_diff"] = cpu_kernel
    return {"cases": {"deformable_sum": case}}


def test_step_one_picks_the_fused_head_only_where_it_is_right_and_no_slower():
    head, why = P.pick_head(_deformable(fused=1.0, cpu_kernel=2e-6))
    assert head == "fused" and "1.0 ms a layer against 2.0 ms per point" in why and "captured" in why
    assert P.pick_head(_deformable(fused=2.5))[0] == "standard"
    assert "differs from the per-point form" in P.pick_head(_deformable(fused=1.0, diff=0.01))[1]
    assert "differs from the CPU kernel by 0.3" in P.pick_head(_deformable(fused=1.0, cpu_kernel=0.3))[1]
    bad = P.pick_head(_deformable(fused=1.0, check={"fallback": "the CUDA kernel ... disagrees by 0.5"}))
    assert bad[0] == "standard" and "disagrees by 0.5" in bad[1]
    assert P.pick_head(_deformable())[0] == "standard"  # no op library: the fused form never ran
    failed = _deformable()
    failed["cases"]["deformable_sum"]["forms"]["fused"] = {"failed": "CUDA failure 209"}
    assert "CUDA failure 209" in P.pick_head(failed)[1]
    assert P.pick_head(None)[0] == "fused"  # step 1 skipped: the export's default, the pipeline's own fallback


def test_step_two_picks_a_sam_attention_form_only_where_it_agrees_and_is_clearly_faster():
    def report(mha, augmented, diff=1e-3):
        return {"cases": {"sam_attention": {"precision": "fp16", "output_scale": 4.0, "forms": {
            "plain": {"p50_ms": 1.0, "max_abs_diff": 0.0}, "mha": {"p50_ms": mha, "max_abs_diff": diff},
            "augmented": {"p50_ms": augmented, "max_abs_diff": diff}}}}}

    assert P.pick_sam_attention(report(0.8, 0.9))[0] == "mha"
    assert P.pick_sam_attention(report(0.99, 0.98))[0] == "plain"  # within the margin: the default
    assert P.pick_sam_attention(report(0.5, 0.6, diff=1.0))[0] == "plain"  # fast but wrong
    assert P.pick_sam_attention(None) == ("plain", "step 2 did not run: the export's default")


def test_the_summary_names_the_fastest_configuration_that_matches():
    measured = {"vit_b": {"joined-all-on": {"p50_ms": 20.0}, "per-caption-all-on": {"p50_ms": 30.0},
                          "per-caption-cuda-graphs": {"p50_ms": 35.0}},
                "vit_h": {"joined-all-on": {"p50_ms": 33.0}}}
    verdicts = {"vit_b": {"joined-all-on": False, "per-caption-all-on": True, "per-caption-cuda-graphs": None}}
    got = P.summarise_configurations(measured, verdicts)
    assert (got["fastest"]["variant"], got["fastest"]["configuration"]) == ("vit_b", "joined-all-on")
    assert got["fastest_matching"]["configuration"] == "per-caption-all-on"
    assert got["per_variant"]["vit_h"]["fastest_matching"] is None
    assert [r["p50_ms"] for r in got["table"]] == [20.0, 30.0, 33.0, 35.0]


def test_commands_take_settings_as_fields_and_the_environment_loses_the_switch_variables():
    assert R.setting_words({"cuda_graphs": True, "overlap": False, "cuda_tf32": "head"}) == [
        "--setting", "cuda_graphs=true", "--setting", "overlap=false", "--setting", "cuda_tf32=head"]
    assert R.option_words({"joined_captions": True}) == ["--option", "joined_captions=true"]
    assert R.settings_environment({"cuda_graphs": True, "cuda_tf32": "head"}) == {"SAA_CUDA_GRAPHS": "1",
                                                                                 "SAA_CUDA_TF32": "head"}
    env, removed = R.clean_environment({"SAA_CUDA_GRAPHS": "1", "SAA_OVERLAP": "1", "PATH": "/bin",
                                        "SAA_TEST_FULL_TINY_ENGINES": "x"})
    assert removed == ["SAA_CUDA_GRAPHS", "SAA_OVERLAP"] and env["PATH"] == "/bin" and "SAA_OVERLAP" not in env
    assert env["SAA_TEST_FULL_TINY_ENGINES"] == "x" and env["PYTHONUNBUFFERED"] == "1"
    assert R.thread_shares(16) == {"side": 2, "vit_b": 8, "vit_h": 6} and R.thread_shares(2) == {"side": 1, "vit_b": 1, "vit_h": 1}
    from bench.latency import build_parser

    parsed = build_parser().parse_args(["--engine-dir", "e", "--setting", "cuda_graphs=true", "--setting", "overlap=1"])
    assert parsed.setting == ["cuda_graphs=true", "overlap=1"]


# ---------------------------------------------------------------------------------- a run with stand-in processes


class FakeProcess:
    def __init__(self, executor: "FakeExecutor", ends_at: float, code: int, on_end, waits_for: Path | None = None) -> None:
        self.executor, self.ends_at, self.code, self.on_end, self.pid = executor, ends_at, code, on_end, 0
        self.stopped, self.waits_for = False, waits_for

    def poll(self):
        if self.stopped:
            return -2
        if self.executor.now >= self.ends_at and (self.waits_for is None or self.waits_for.is_file()):
            if self.on_end is not None:
                self.on_end()
                self.on_end = None
            return self.code
        return None


def _arg(command, flag):
    return command[command.index(flag) + 1] if flag in command else None


class FakeExecutor(R.Executor):
    """Every step takes `durations[step id]` seconds on a fake clock and writes what the real one would."""

    def __init__(self, durations: dict[str, float], p50: dict[str, float], matching: set[str], failing: set[str] = frozenset(),
                 fused_ms: float = 1.0) -> None:
        self.now = 0.0
        self.clock = lambda: self.now
        self.durations, self.p50, self.matching, self.failing, self.fused_ms = durations, p50, matching, failing, fused_ms
        self.commands: list[list[str]] = []
        self.started: list[list[str]] = []

    def start(self, command, log, env):
        self.started.append(list(command))
        out = Path(_arg(command, "--out"))
        variant = _arg(command, "--sam-variant")

        def write():
            head = _arg(command, "--deformable-attention") or "fused"
            if variant == "vit_h":  # it takes the ViT-B dir's head
                source = json.loads((Path(_arg(command, "--reuse-from")) / "manifest.json").read_text())
                head = source["models"]["gdino_head"]["source"]["deformable_attention"]
            out.mkdir(parents=True, exist_ok=True)
            (out / "manifest.json").write_text(json.dumps({"size": "full", "precision": "fp16", "models": {
                "gdino_head": {"source": {"deformable_attention": head}}}}))

        duration = self.durations[f"00-export-{variant}"]
        source = _arg(command, "--reuse-from")  # --reuse-wait: done once the ViT-B dir is
        return FakeProcess(self, self.now + duration, 0, write, Path(source) / "manifest.json" if source else None)

    def stop(self, process):
        process.stopped = True

    def sleep(self, seconds):
        self.now += seconds

    def run(self, command, log, env, timeout, tick=None):
        self.commands.append(list(command))
        out = Path(_arg(command, "--out"))
        duration = self.durations.get(out.stem, 40.0 if out.stem.startswith("06-") else 10.0)
        if duration > timeout:
            self.now += timeout
            return None, True
        self.now += duration
        if tick:
            tick()
        if out.stem in self.failing:
            return 1, False
        module = command[2]
        if module == "bench.gpu.op_forms":
            case = _arg(command, "--case")
            report = _deformable(fused=self.fused_ms) if case == "deformable_sum" else {"cases": {"sam_attention": {
                "precision": "fp16", "output_scale": 1.0, "forms": {"plain": {"p50_ms": 1.0, "max_abs_diff": 0.0},
                                                                    "mha": {"p50_ms": 0.5, "max_abs_diff": 1e-3}}}}}
            record = report
        elif module == "bench.latency":
            name = out.stem.split("-", 2)[2] if "--reference" not in command else "reference"
            record = {"end_to_end_p50_ms": self.p50.get(out.stem, self.p50.get(name, 50.0)), "cuda_graphs": {}}
            if "--reference" in command:
                record.update(speedup_vs_reference=16.0, reference_stages={"total": {"reference_p50_ms": 480.0}})
        elif module == "bench.gpu.compare":
            spec = json.loads(Path(_arg(command, "--candidates")).read_text())
            candidates, found = [], False
            for candidate in spec["candidates"]:
                matches = None if found else candidate["name"] in self.matching
                found = found or bool(matches)
                candidates.append({"name": candidate["name"], "matches": matches})
            record = {"candidates": candidates}
        else:  # kernel_times
            record = {_arg(command, "--label"): {"calls": 5}}
        out.write_text(json.dumps(record))
        return 0, False


def _args(tmp_path: Path, budget: float, skip_export: bool = False) -> argparse.Namespace:
    return argparse.Namespace(out=str(tmp_path / "out"), budget_s=budget, device="cuda", skip_export=skip_export,
                              engines_root=str(tmp_path / "engines"), tiny=False, precision="fp16", iters=20, force=False,
                              argv=["--out", str(tmp_path / "out")])


def _bench(tmp_path, budget, executor, **kwargs):
    bench = R.BenchRun(_args(tmp_path, budget, **kwargs), executor=executor)
    bench._warm_flag = True
    bench.machine = lambda: {"device": "cuda", "device_name": "a GPU", "driver": "1.0", "versions": {}}
    return bench


def summary_step(summary, step_id):
    return next(s for s in summary["steps"] if s["id"] == step_id)


def test_a_short_budget_skips_the_vit_h_steps_and_keeps_every_record(tmp_path):
    durations = {"00-export-vit_b": 180, "00-export-vit_h": 100, "01-deformable": 40, "02-sam-attention": 30,
                 "04-vit_b-per-caption-all-on": 400}  # this one runs past its time: stopped, recorded
    p50 = {"per-caption-cuda-graphs": 40.0, "joined-all-on": 20.0, "per-caption-all-on-tf32-head": 30.0}
    executor = FakeExecutor(durations, p50, matching={"per-caption-all-on-tf32-head"}, failing={"05-vit_b-kernels"})
    summary = _bench(tmp_path, R.DEFAULT_BUDGET_S, executor).execute()
    out = tmp_path / "out"
    status = {s["id"]: s["status"] for s in summary["steps"]}
    assert status["00-export-vit_b"] == status["00-export-vit_h"] == "done"
    assert status["03-vit_b-per-caption-cuda-graphs"] == "done" and status["04-vit_b-per-caption-all-on"] == "timed_out"
    assert status["05-vit_b-kernels"] == "failed" and status["07-reference"] == "done"
    ran = [Path(_arg(c, "--out")).stem for c in executor.commands if "06-vit_h" in _arg(c, "--out")]
    assert ran == ["06-vit_h-joined-all-on", "06-vit_h-per-caption-all-on-tf32-head",
                   "06-vit_h-per-caption-cuda-graphs"]  # in ViT-B's order of speed, then the budget was short
    for step in ("06-vit_h-per-caption-all-on", "06-vit_h-compare", "06-vit_h-kernels"):
        assert status[step] == "skipped" and "leave ~90 s for the reference" in summary_step(summary, step)["reason"]
    for step in summary["steps"]:  # every step has its file, with its status and, skipped, the reason
        record = json.loads((out / f"{step['id']}.json").read_text())
        assert record["step"]["status"] == step["status"]
        if step["status"] == "skipped":
            assert "out of budget" in record["step"]["reason"] or "engines" in record["step"]["reason"]
    assert json.loads((out / "03-vit_b-per-caption-cuda-graphs.json").read_text())["end_to_end_p50_ms"] == 40.0
    assert summary["complete"] and summary["fastest"]["configuration"] == "joined-all-on"
    assert summary["fastest_matching_faithful"]["configuration"] == "per-caption-all-on-tf32-head"
    assert summary["reference"]["speedup"] == 16.0 and summary["device_name"] == "a GPU"
    reference = next(c for c in executor.commands if "--reference" in c)  # beside the fastest: joined
    assert "joined_captions=true" in reference and "cuda_tf32=head" in reference
    compare = json.loads((out / "work" / "04-vit_b-compare-candidates.json").read_text())
    assert [c["name"] for c in compare["candidates"]][:3] == ["joined-all-on", "per-caption-all-on-tf32-head",
                                                             "per-caption-cuda-graphs"]  # fastest first
    kernels = next(c for c in executor.commands if c[2] == "bench.gpu.kernel_times")
    assert "joined_captions=true" in kernels and "--label" in kernels
    vit_h_export = executor.started[1]
    assert _arg(vit_h_export, "--reuse-from").endswith("engines-vit_b") and _arg(vit_h_export, "--sam-attention") == "mha"
    assert "--no-warm" in vit_h_export and _arg(executor.started[0], "--threads") is not None
    assert all("--setting" not in c or c[2] != "bench.latency" or "SAA_CUDA_GRAPHS" not in str(c)
               for c in executor.commands)
    assert json.loads((out / "00-plan.json").read_text())["budget_s"] == R.DEFAULT_BUDGET_S


def test_a_wrong_fused_op_restarts_the_vit_b_export_with_the_standard_head(tmp_path):
    durations = {"00-export-vit_b": 180, "00-export-vit_h": 100, "01-deformable": 40, "02-sam-attention": 30}
    executor = FakeExecutor(durations, {}, matching=set(), fused_ms=5.0)  # slower than the per-point form
    bench = _bench(tmp_path, 2000, executor)
    summary = bench.execute()
    assert summary["head"]["picked"] == "standard" and "5.0 ms a layer" in summary["head"]["why"]
    assert [_arg(c, "--deformable-attention") for c in executor.started if _arg(c, "--sam-variant") == "vit_b"] == [
        "fused", "standard"]
    assert summary["head"]["engines"] == {"vit_b": "standard", "vit_h": "standard"}
    export = json.loads((tmp_path / "out" / "00-export-vit_b.json").read_text())["step"]
    assert export["restarts"][0]["why"].startswith("step 1 picked the standard head")
    assert all(s["status"] == "done" for s in summary["steps"])
    assert summary["fastest_matching_faithful"] is None  # nothing matched: none is named


def test_skip_export_measures_the_engines_at_hand_and_says_what_is_missing(tmp_path):
    (tmp_path / "engines" / "engines-vit_b").mkdir(parents=True)
    (tmp_path / "engines" / "engines-vit_b" / "manifest.json").write_text(json.dumps({"models": {}}))
    executor = FakeExecutor({}, {}, matching={"per-caption-cuda-graphs"})
    summary = _bench(tmp_path, 2000, executor, skip_export=True).execute()
    status = {s["id"]: s for s in summary["steps"]}
    assert "00-export-vit_b" not in status and status["03-vit_b-per-caption-cuda-graphs"]["status"] == "done"
    assert status["06-vit_h-kernels"]["status"] == "skipped" and "--skip-export" in status["06-vit_h-kernels"]["reason"]
    assert executor.started == []


def test_preflight_says_what_is_missing_before_any_minute_is_spent(tmp_path):
    import onnxruntime

    args = _args(tmp_path, 100)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "pip install onnxruntime-gpu" in R.preflight(args) and "uninstall" in R.preflight(args)
    args.device, args.skip_export, args.force = "cpu", True, False
    assert "--skip-export: no engines at" in R.preflight(args)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("{}")
    assert "holds an earlier run" in R.preflight(args) and "--force" in R.preflight(args)
    assert R.main(["--out", str(tmp_path / "o"), "--plan", "--budget-s", "300"]) == 0


# ---------------------------------------------------------------------------------- export --reuse-from


def _export(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "export", *args, "--no-warm"], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_reuse_from_exports_sam_alone_and_links_the_rest(full_tiny_engine_dir, tmp_path):
    from runtime import manifest as mf

    out = tmp_path / "engines-vit_h"
    done = _export("--profile", "full", "--tiny", "--random-init", "--reuse-from", str(full_tiny_engine_dir),
                   "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[GroundingDINO]" not in done.stderr and "[reuse] took gdino_text, gdino_image, gdino_head, saliency" in done.stderr
    source, made = (json.loads((d / "manifest.json").read_text()) for d in (full_tiny_engine_dir, out))
    for name in P_REUSED:
        assert made["models"][name] == source["models"][name]  # carried as they were, sha256 included
        assert (out / made["models"][name]["file"]).stat().st_ino == (full_tiny_engine_dir / source["models"][name]["file"]).stat().st_ino
    assert made["files"]["tokenizer"] == source["files"]["tokenizer"]
    assert made["preprocess"]["gdino"] == source["preprocess"]["gdino"] and "sam" in made["preprocess"]
    assert made["reused_from"]["engines"] == str(full_tiny_engine_dir.resolve())
    assert list(made["models"]) == list(mf.PROFILE_MODELS["full"])
    mf.load_manifest(out, verify_hashes=True)  # a consistent engines dir


P_REUSED = ("gdino_text", "gdino_image", "gdino_head", "saliency")


@pytest.mark.parametrize("flags, words", [
    (("--precision", "fp16"), "its precision is fp32, this export's fp16"),
    (("--deformable-attention", "standard"), "its deformable attention is fused, this export's standard"),
    (("--detector-size", "256x256"), "its detector size is 224x224, this export's 256x256"),
    (("--saliency-checkpoint", "x.pth"), "--saliency-checkpoint with --reuse-from"),
])
def test_reuse_from_refuses_a_dir_of_another_form_at_once(full_tiny_engine_dir, tmp_path, flags, words):
    start = time.monotonic()
    done = _export("--profile", "full", "--tiny", "--random-init", "--reuse-from", str(full_tiny_engine_dir),
                   *flags, "--out", str(tmp_path / "h"))
    assert done.returncode == 2 and words in done.stderr, done.stderr[-1500:]
    assert not (tmp_path / "h").exists() and time.monotonic() - start < 60  # before any export work


def test_reuse_from_refuses_a_missing_dir_unless_told_to_wait(tmp_path):
    done = _export("--profile", "full", "--tiny", "--random-init", "--reuse-from", str(tmp_path / "none"),
                   "--out", str(tmp_path / "h"))
    assert done.returncode == 2 and "no manifest.json there (give --reuse-wait" in done.stderr
    done = _export("--profile", "lite", "--reuse-from", str(tmp_path), "--out", str(tmp_path / "h"))
    assert done.returncode == 2 and "only the full profile" in done.stderr


def test_reuse_wait_takes_the_dir_once_its_export_writes_the_manifest(tmp_path):
    """The ViT-H export starts before the ViT-B one ends: it waits for the manifest, moved in last."""
    import threading

    pytest.importorskip("torch")
    from export.common import ExportError
    from export.engine_dir import _wait_for_manifest

    later = threading.Timer(1.0, lambda: (tmp_path / "manifest.json").write_text("{}"))
    later.start()
    start = time.monotonic()
    _wait_for_manifest(tmp_path, 30)
    assert 0.9 < time.monotonic() - start < 10
    later.join()
    with pytest.raises(ExportError, match="no manifest.json after waiting 1 s"):
        _wait_for_manifest(tmp_path / "none", 1)


# ---------------------------------------------------------------------------------- the whole run, on this CPU


@pytest.mark.slow
def test_the_whole_run_rehearses_on_the_cpu_with_tiny_engines(tmp_path):
    """`python -m bench.gpu --device cpu --tiny`: every step, with the GPU paths on the CPU provider."""
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if not key.startswith("SAA_TEST")}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(out), "--device", "cpu", "--tiny",
                           "--budget-s", "1500", "--engines-root", str(tmp_path / "engines")],
                          cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"], summary
    failed = [s for s in summary["steps"] if s["status"] != "done"]
    assert not failed, failed
    assert summary["head"]["engines"] == {"vit_b": "fused", "vit_h": "fused"} and summary["head"]["picked"] == "fused"
    assert summary["fastest"] is not None and summary["fastest_matching_faithful"] is not None
    assert summary["reference"]["speedup"] > 0
    vit_h = json.loads((tmp_path / "engines" / "engines-vit_h" / "manifest.json").read_text())
    assert vit_h["reused_from"]["models"] == list(P_REUSED)
    latency = json.loads((out / "03-vit_b-per-caption-cuda-graphs.json").read_text())
    assert latency["settings"]["cuda_graphs"] is True and latency["cuda_graphs"]["sam_decoder"] == "captured"
    kernels = json.loads((out / "05-vit_b-kernels.json").read_text())
    assert next(iter(kernels.values()))["settings"]["overlap"] is False
    print(f"rehearsal: {wall:.0f} s")


def test_a_failed_vit_b_export_skips_what_needs_engines_and_stops_the_vit_h_export(tmp_path):
    durations = {"00-export-vit_b": 100, "00-export-vit_h": 50}

    class FailingExport(FakeExecutor):
        def start(self, command, log, env):
            process = super().start(command, log, env)
            if _arg(command, "--sam-variant") == "vit_b":
                process.code, process.on_end = 1, None  # no manifest, exit 1
            return process

    executor = FailingExport(durations, {}, matching=set())
    summary = _bench(tmp_path, R.DEFAULT_BUDGET_S, executor).execute()
    status = {s["id"]: s for s in summary["steps"]}
    assert status["00-export-vit_b"]["status"] == "failed" and status["01-deformable"]["status"] == "done"
    assert status["00-export-vit_h"]["status"] == "failed" and "takes GroundingDINO from failed" in status["00-export-vit_h"]["reason"]
    assert status["03-vit_b-per-caption-cuda-graphs"]["status"] == "skipped"
    assert "its export failed" in status["03-vit_b-per-caption-cuda-graphs"]["reason"]
    assert status["07-reference"]["reason"] == "no configuration was measured"
    assert summary["elapsed_s"] < 200 and summary["complete"]  # nothing waited for the budget to run out
