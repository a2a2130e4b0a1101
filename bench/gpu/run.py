"""`python -m bench.gpu`: the runtime measured on a machine with a GPU, in one command.

    python -m bench.gpu --out gpu-results/                                  (exports, then every step)
    python -m bench.gpu --out gpu-results/ --skip-export --engines-root DIR (engines exported before)
    python -m bench.gpu --out rehearsal/ --device cpu --tiny                (every step on a CPU, tiny engines)

bench/gpu/README.md says what each step measures and what comes back. In short: the engines are
exported in parallel processes (GroundingDINO once, shared by the ViT-B and ViT-H dirs through
`export --reuse-from`), while steps 1 and 2 time the export forms one layer at a time and pick
the head's deformable attention and SAM's attention for what is still to export; then each
configuration of plan.configurations is timed with bench.latency, compared with the faithful
path (bench/gpu/compare.py), and the fastest one's kernels are profiled, for ViT-B and then ViT-H;
last, the PyTorch reference runs beside the fastest configuration. Every step writes its JSON
into --out as soon as it ends, and summary.json is rewritten after each one, so a run cut short
keeps what it measured. A step the budget cannot take is skipped with the reason, never one
already done.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from . import plan as P

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 540.0
DEFAULT_ENGINES_ROOT = Path(tempfile.gettempdir()) / "saa-edge-gpu-engines"  # engines are GBs: not beside the results
ENGINE_DIR = "engines-{variant}"
TINY_DETECTOR = "224x224"
LATENCY_ITERS, LATENCY_WARMUP = 20, 5  # the first calls capture CUDA graphs and run the overlap in order
REFERENCE_ITERS = 5
KERNEL_ITERS = 5


def setting_words(settings: dict[str, Any]) -> list[str]:
    """EngineSettings fields as `--setting KEY=VALUE` arguments."""
    words: list[str] = []
    for key, value in settings.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        words += ["--setting", f"{key}={text}"]
    return words


def option_words(options: dict[str, Any]) -> list[str]:
    words: list[str] = []
    for key, value in options.items():
        words += ["--option", f"{key}={json.dumps(value)}"]
    return words


def settings_environment(settings: dict[str, Any]) -> dict[str, str]:
    """The SAA_* variables of EngineSettings fields (for a bench.latency without --setting)."""
    from runtime.settings import setting_fields

    variables = {spec.name: spec.metadata["env"] for spec in setting_fields()}
    out = {}
    for key, value in settings.items():
        if variables.get(key) is None:
            raise ValueError(f"setting {key} has no environment variable: this bench.latency takes no --setting")
        out[variables[key]] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out


def clean_environment(base: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """The environment for the steps: without the SAA_* variables of EngineSettings fields (each
    configuration says its switches itself), Python unbuffered. Also the names removed."""
    from runtime.settings import setting_fields

    base = dict(os.environ if base is None else base)
    names = {spec.metadata["env"] for spec in setting_fields() if spec.metadata["env"]}
    removed = sorted(name for name in base if name in names)
    env = {key: value for key, value in base.items() if key not in names}
    env["PYTHONUNBUFFERED"] = "1"
    return env, removed


def thread_shares(cpus: int) -> dict[str, int]:
    """CPU threads for the two exports and for the steps that run beside them."""
    side = 2 if cpus >= 8 else 1
    rest = max(cpus - side, 2)
    vit_b = max(1, round(rest * 4 / 7))  # GroundingDINO's export is the longest
    return {"side": side, "vit_b": vit_b, "vit_h": max(1, rest - vit_b)}


class Executor:
    """Starts the steps' processes, each in its own process group (a step's own children go with
    it when it is stopped). A test's stand-in replaces it."""

    clock: Callable[[], float] = staticmethod(time.monotonic)

    def start(self, command: Sequence[str], log: Path, env: dict[str, str]) -> Any:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            handle.write("$ " + " ".join(command) + "\n")
            handle.flush()
            return subprocess.Popen(list(command), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)

    def run(self, command: Sequence[str], log: Path, env: dict[str, str], timeout: float,
            tick: Callable[[], None] | None = None) -> tuple[int | None, bool]:
        """(exit code, whether it was stopped at `timeout`); `tick` is called about every second meanwhile."""
        process = self.start(command, log, env)
        deadline = self.clock() + timeout
        try:
            while True:
                try:
                    return process.wait(timeout=max(0.0, min(1.0, deadline - self.clock()))), False
                except subprocess.TimeoutExpired:
                    if self.clock() >= deadline:
                        self.stop(process)
                        return None, True
                    if tick is not None:
                        tick()
        except BaseException:  # Ctrl-C: the step's process goes with this one
            self.stop(process)
            raise

    def stop(self, process: Any) -> None:
        """SIGINT first (an export then removes its unfinished folder), SIGKILL after 15 s."""
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=15)
        except (ProcessLookupError, PermissionError):
            return
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(record, indent=1, default=str) + "\n")
    scratch.replace(path)  # a reader never sees half a file


class BenchRun:
    """One run of the plan: its processes, records and decisions."""

    def __init__(self, args: argparse.Namespace, executor: Executor | None = None,
                 estimates: P.Estimates | None = None) -> None:
        self.args = args
        self.executor = executor or Executor()
        self.device = args.device
        self.tiny = args.tiny
        self.out = Path(args.out)
        self.root = Path(args.engines_root)
        self.estimates = estimates or (P.TINY if args.tiny else P.FULL_SIZE)
        self.export = not args.skip_export
        self.steps = P.make_plan(self.estimates, self.device, export=self.export)
        self.budget = P.Budget(args.budget_s, clock=self.executor.clock)
        self.env, self.removed_variables = clean_environment()
        self.shares = thread_shares(os.cpu_count() or 2)
        self.records: dict[str, dict[str, Any]] = {}  # step id -> its status record
        self.exports: dict[str, dict[str, Any]] = {}  # variant -> {"process", "command", "log", "started"}
        self.head, self.head_why = "fused", "the export's default"
        self.attention, self.attention_why = "plain", "the export's default"
        self.latency_takes_settings = self._latency_takes_settings()
        self.started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    # ------------------------------------------------------------------ paths and commands

    def engines(self, variant: str) -> Path:
        return self.root / ENGINE_DIR.format(variant=variant)

    def step(self, step_id: str) -> P.Step:
        return next(s for s in self.steps if s.id == step_id)

    def _latency_takes_settings(self) -> bool:
        from bench.latency import build_parser

        return any("--setting" in action.option_strings for action in build_parser()._actions)

    def export_command(self, variant: str) -> list[str]:
        command = [sys.executable, "-m", "export", "--profile", "full", "--random-init", "--sam-variant", variant,
                   "--precision", self.args.precision, "--parity", "quick", "--threads", str(self.shares[variant]),
                   "--out", str(self.engines(variant)), "--force"]
        if self.tiny:
            command.append("--tiny")
        if variant == "vit_b":
            command += ["--deformable-attention", self.head]
            if self.tiny:
                command += ["--detector-size", TINY_DETECTOR]
        else:  # GroundingDINO and the saliency CNN from the ViT-B dir, whose export may still run
            command += ["--reuse-from", str(self.engines("vit_b")), "--reuse-wait", str(int(max(self.budget.left(), 1)))]
            if self.attention != "plain":
                command += ["--sam-attention", self.attention]
        if self._export_warms():
            command.append("--no-warm")  # the steps' warm-up calls compile the kernels; not worth the minutes here
        return command

    def _export_warms(self) -> bool:
        if not hasattr(self, "_warm_flag"):
            done = subprocess.run([sys.executable, "-m", "export", "--help"], cwd=REPO, capture_output=True, text=True,
                                  env=self.env, timeout=120)
            self._warm_flag = "--no-warm" in done.stdout
        return self._warm_flag

    def latency_command(self, step: P.Step, configuration: P.Configuration,
                        reference: bool = False) -> tuple[list[str], dict[str, str]]:
        iters = REFERENCE_ITERS * 2 if reference else self.args.iters
        command = [sys.executable, "-m", "bench.latency", "--engine-dir", str(self.engines(step.variant)),
                   "--device", self.device, "--iters", str(iters), "--warmup", str(LATENCY_WARMUP),
                   "--out", str(self.out / f"{step.id}.json"), *option_words(configuration.options)]
        if reference:
            command += ["--reference", "--reference-iters", str(REFERENCE_ITERS)]
        env = dict(self.env)
        if self.latency_takes_settings:
            command += setting_words(configuration.settings)
        else:
            env.update(settings_environment(configuration.settings))
        return command, env

    # ------------------------------------------------------------------ records

    def finish(self, step: P.Step, status: str, started: float | None = None, **fields: Any) -> dict[str, Any]:
        """Record a step: into its own JSON (the step's output, where it wrote one, gets a "step" key)
        and into summary.json."""
        info = {"id": step.id, "kind": step.kind, "status": status, "estimate_s": step.estimate_s,
                "wall_s": None if started is None else round(self.executor.clock() - started, 1),
                "at_s": round(self.budget.elapsed(), 1), **fields}
        self.records[step.id] = info
        path = self.out / f"{step.id}.json"
        output = _read_json(path) if status == "done" else None
        _write_json(path, {**output, "step": info} if output is not None else {"step": info})
        mark = {"done": "done", "skipped": "SKIPPED", "failed": "FAILED", "timed_out": "TIMED OUT"}.get(status, status)
        reason = f": {fields['reason']}" if fields.get("reason") else ""
        print(f"[{self.budget.elapsed():6.0f} s] {step.id} {mark}{reason}", flush=True)
        self.write_summary(final=False)
        return info

    def output(self, step_id: str) -> dict[str, Any] | None:
        """A finished step's JSON, or None."""
        if self.records.get(step_id, {}).get("status") != "done":
            return None
        return _read_json(self.out / f"{step_id}.json")

    # ------------------------------------------------------------------ running one step

    def attempt(self, step: P.Step, command: Sequence[str] | None, env: dict[str, str] | None = None,
                precondition: str | None = None, **fields: Any) -> bool:
        """Run `step` as `command` unless `precondition` (a reason) or the budget says no. True where it ran to the end."""
        self.poll_exports()
        if precondition:
            self.finish(step, "skipped", reason=precondition, **fields)
            return False
        reason = self.budget.skip_reason(step)
        if reason:
            self.finish(step, "skipped", reason=reason, **fields)
            return False
        log = self.out / "logs" / f"{step.id}.log"
        started = self.executor.clock()
        timeout = self.budget.timeout_for(step)
        print(f"[{self.budget.elapsed():6.0f} s] {step.id}: {step.about} (~{step.estimate_s:.0f} s)", flush=True)
        (self.out / f"{step.id}.json").unlink(missing_ok=True)  # what it writes, and nothing older, is its result
        code, timed_out = self.executor.run(list(command), log, env or self.env, timeout, tick=self.poll_exports)
        base = {"command": " ".join(command), "log": str(log.relative_to(self.out)), **fields}
        if timed_out:
            self.finish(step, "timed_out", started, reason=f"stopped after {timeout:.0f} s", log_tail=_tail(log), **base)
            return False
        if code != 0 or _read_json(self.out / f"{step.id}.json") is None:
            self.finish(step, "failed", started, reason=f"exit {code}" + ("" if code else ", no JSON written"),
                        log_tail=_tail(log), **base)
            return False
        self.finish(step, "done", started, **base)
        self.poll_exports()
        return True

    # ------------------------------------------------------------------ the exports

    def start_export(self, variant: str) -> None:
        step = self.step(f"00-export-{variant}")
        command = self.export_command(variant)
        log = self.out / "logs" / f"{step.id}.log"
        env = dict(self.env)
        print(f"[{self.budget.elapsed():6.0f} s] {step.id}: {' '.join(command[1:])}", flush=True)
        self.exports[variant] = {"process": self.executor.start(command, log, env), "command": command, "log": log,
                                 "started": self.executor.clock(), "restarts": self.exports.get(variant, {}).get("restarts", [])}

    def restart_export(self, variant: str, why: str) -> None:
        running = self.exports[variant]
        self.executor.stop(running["process"])
        running["restarts"].append({"at_s": round(self.budget.elapsed(), 1), "why": why,
                                    "command": " ".join(running["command"])})
        self.start_export(variant)

    def wait_for_export(self, variant: str) -> str | None:
        """Block until `variant`'s export is done; None when its engines are there, else why not."""
        if not self.export:
            dir_ = self.engines(variant)
            return None if (dir_ / "manifest.json").is_file() else f"no engines at {dir_} (--skip-export)"
        step_id = f"00-export-{variant}"
        running = self.exports.get(variant)
        if running is None and step_id not in self.records:
            return "its export did not start"
        while step_id not in self.records:
            self.poll_exports()
            if step_id in self.records:
                break
            if self.budget.left() <= 0:
                self.executor.stop(running["process"])
                self.finish(self.step(step_id), "timed_out", running["started"], reason="the budget ran out during the export",
                            command=" ".join(running["command"]), log_tail=_tail(running["log"]))
                break
            self.executor.sleep(1.0)
        record = self.records[step_id]
        return None if record["status"] == "done" else f"its export {record['status']} ({record.get('reason')})"

    def poll_exports(self) -> None:
        """Record the exports that have ended since the last look (between steps and while waiting)."""
        for variant, running in self.exports.items():
            step_id = f"00-export-{variant}"
            code = running["process"].poll()
            source = self.records.get("00-export-vit_b", {}).get("status")
            if variant != "vit_b" and code is None and source not in (None, "done"):
                self.executor.stop(running["process"])  # it would wait for a dir that never comes
                self.finish(self.step(step_id), "failed", running["started"], reason=f"the ViT-B export it takes "
                            f"GroundingDINO from {source}", command=" ".join(running["command"]))
                continue
            if code is None or step_id in self.records:
                continue
            step = self.step(step_id)
            base = {"command": " ".join(running["command"]), "log": str(running["log"].relative_to(self.out)),
                    "restarts": running["restarts"], "threads": self.shares[variant]}
            if code != 0 or not (self.engines(variant) / "manifest.json").is_file():
                self.finish(step, "failed", running["started"], reason=f"exit {code}", log_tail=_tail(running["log"]), **base)
                continue
            manifest = _read_json(self.engines(variant) / "manifest.json") or {}
            _write_json(self.out / f"{step_id}.json", {"engines": str(self.engines(variant)), "manifest": {
                key: manifest.get(key) for key in ("size", "precision", "random_init", "parity_checks", "created",
                                                   "versions", "reused_from")},
                "models": {name: {"parity": entry.get("parity"), "source": entry.get("source"),
                                  "size_bytes": entry.get("size_bytes")} for name, entry in manifest.get("models", {}).items()}})
            self.finish(step, "done", running["started"], **base)

    def running_exports(self) -> list[str]:
        """The exports still running (beside a timing: its record says so)."""
        return [variant for variant, running in self.exports.items() if running["process"].poll() is None]

    def stop_exports(self) -> None:
        for variant, running in self.exports.items():
            if running["process"].poll() is None:
                self.executor.stop(running["process"])
                step = self.step(f"00-export-{variant}")
                if step.id not in self.records:
                    self.finish(step, "failed", running["started"], reason="stopped: the run ended before it")

    # ------------------------------------------------------------------ the steps

    def side_environment(self) -> dict[str, str]:
        threads = str(self.shares["side"] if self.exports else max(1, os.cpu_count() or 1))
        return {**self.env, "OMP_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads}

    def op_forms(self, step: P.Step, case: str) -> dict[str, Any] | None:
        command = [sys.executable, "-m", "bench.gpu.op_forms", "--device", "cpu" if self.device == "cpu" else "cuda",
                   "--case", case, "--out", str(self.out / f"{step.id}.json")]
        if self.tiny:
            command += ["--small", "--iters", "5"]
        self.attempt(step, command, self.side_environment())
        return self.output(step.id)

    def deformable(self) -> None:
        step = self.step("01-deformable")
        report = self.op_forms(step, "deformable_sum")
        self.head, self.head_why = P.pick_head(report)
        self.records[step.id]["picked"] = {"head": self.head, "why": self.head_why}
        self._annotate(step.id, picked=self.records[step.id]["picked"])
        print(f"           head: {self.head} ({self.head_why})", flush=True)
        running = self.exports.get("vit_b")
        if self.head != "fused" and running is not None and running["process"].poll() is None:
            self.restart_export("vit_b", f"step 1 picked the {self.head} head: {self.head_why}")

    def sam_attention(self) -> None:
        step = self.step("02-sam-attention")
        report = self.op_forms(step, "sam_attention")
        self.attention, self.attention_why = P.pick_sam_attention(report)
        self.records[step.id]["picked"] = {"sam_attention": self.attention, "why": self.attention_why,
                                           "applies_to": "the ViT-H export (the ViT-B one started at once)"
                                           if self.export else "nothing: --skip-export"}
        self._annotate(step.id, picked=self.records[step.id]["picked"])
        print(f"           SAM attention: {self.attention} ({self.attention_why})", flush=True)

    def _annotate(self, step_id: str, **fields: Any) -> None:
        path = self.out / f"{step_id}.json"
        record = _read_json(path) or {}
        record.setdefault("step", {}).update(fields)
        _write_json(path, record)
        self.write_summary(final=False)

    def measured(self, variant: str) -> dict[str, dict[str, Any]]:
        """configuration -> its latency figures, for the variant's finished latency steps."""
        out = {}
        for step in self.steps:
            if step.kind == "latency" and step.variant == variant:
                record = self.output(step.id)
                if record is not None:
                    out[step.configuration.name] = {
                        "p50_ms": record.get("end_to_end_p50_ms"), "p95_ms": record.get("end_to_end_p95_ms"),
                        "images_per_s": record.get("images_per_s"), "boxes_to_sam": record.get("boxes_to_sam"),
                        "cuda_graphs": record.get("cuda_graphs"), "ops_fallback": record.get("ops_fallback"),
                        "file": f"{step.id}.json"}
        return out

    def configuration(self, name: str) -> P.Configuration:
        return next(c for c in P.configurations(self.device) if c.name == name)

    def measure(self, variant: str) -> None:
        """Steps 3-5 (ViT-B) or 6 (ViT-H): the configurations, the comparison, the kernel profile."""
        missing = self.wait_for_export(variant)
        steps = [s for s in self.steps if s.variant == variant and s.kind != "export"]
        if variant != "vit_b":  # ViT-H where time allows: the configurations in ViT-B's order of speed
            rank = {name: figures["p50_ms"] for name, figures in self.measured("vit_b").items() if figures["p50_ms"]}
            steps.sort(key=lambda s: (s.kind != "latency", rank.get(s.configuration.name, float("inf"))
                                      if s.configuration else 0.0))
        for step in steps:
            if step.kind == "latency":
                command, env = self.latency_command(step, step.configuration)
                self.attempt(step, command, env, precondition=missing and f"no {variant} engines: {missing}",
                             configuration=step.configuration.name, exports_running=self.running_exports())
            elif step.kind == "compare":
                self.compare(step, missing)
            elif step.kind == "kernels":
                self.kernels(step, missing)

    def compare(self, step: P.Step, missing: str | None) -> None:
        measured = self.measured(step.variant)
        order = sorted(measured, key=lambda name: measured[name]["p50_ms"] or float("inf"))
        spec = {"faithful": {"settings": P.faithful(self.device).settings},
                "candidates": [{"name": name, "settings": self.configuration(name).settings,
                                "options": self.configuration(name).options} for name in order]}
        work = self.out / "work" / f"{step.id}-candidates.json"
        _write_json(work, spec)
        # Estimated for every configuration; it stops at the first match, so it needs the faithful run
        # and one at least: it starts where those fit, and compares as many as its time limit takes.
        least = P.Step(step.id, step.kind, 2 * self.estimates.compare_pipeline, step.variant, reserve_s=step.reserve_s,
                       about=step.about)
        limit = max(1.0, self.budget.timeout_for(least) - 15)
        command = [sys.executable, "-m", "bench.gpu.compare", "--engine-dir", str(self.engines(step.variant)),
                   "--device", self.device, "--candidates", str(work), "--time-limit", f"{limit:.0f}",
                   "--out", str(self.out / f"{step.id}.json")]
        reason = (missing and f"no {step.variant} engines: {missing}") or (None if order else "no configuration was measured")
        self.attempt(least, command, precondition=reason, order=order)

    def verdicts(self, variant: str) -> dict[str, bool | None]:
        record = self.output(f"{'04' if variant == 'vit_b' else '06'}-{variant}-compare") or {}
        return {c["name"]: c.get("matches") for c in record.get("candidates", [])}

    def kernels(self, step: P.Step, missing: str | None) -> None:
        best = P.fastest([{"name": name, **figures} for name, figures in self.measured(step.variant).items()])
        reason = (missing and f"no {step.variant} engines: {missing}") or (None if best else "no configuration was measured")
        command: list[str] = []
        if best:
            configuration = self.configuration(best["name"])
            command = [sys.executable, "-m", "bench.gpu.kernel_times", "--engine-dir", str(self.engines(step.variant)),
                       "--device", self.device, "--iters", str(KERNEL_ITERS), "--label",
                       f"{step.variant}-{configuration.name}", "--out", str(self.out / f"{step.id}.json"),
                       *setting_words(configuration.settings), *option_words(configuration.options)]
        self.attempt(step, command, precondition=reason, configuration=best and best["name"],
                     overlap="profiled with the overlap off (kernel_times: its second thread's kernels would be "
                             "charged to the main thread's stages)")

    def reference(self) -> None:
        step = self.step("07-reference")
        rows = [{"variant": variant, "name": name, **figures}
                for variant in P.VARIANTS for name, figures in self.measured(variant).items()]
        best = P.fastest(rows)
        if best is None:
            self.finish(step, "skipped", reason="no configuration was measured")
            return
        configuration = self.configuration(best["name"])
        variant_step = P.Step(step.id, step.kind, step.estimate_s, best["variant"], configuration)
        command, env = self.latency_command(variant_step, configuration, reference=True)
        self.attempt(step, command, env, configuration=best["name"], variant=best["variant"])

    # ------------------------------------------------------------------ the whole run

    def machine(self) -> dict[str, Any]:
        from bench.latency import cpu_model, gpu_info, versions

        gpu = gpu_info() if self.device != "cpu" else {}
        try:
            found = versions(with_torch=False, device=self.device)
        except Exception as err:  # the record must not stop the run
            found = {"error": str(err)}
        try:
            from importlib import metadata

            found["torch"] = metadata.version("torch")
        except Exception:
            pass
        return {"device": self.device, "device_name": gpu.get("name") or cpu_model(), "driver": gpu.get("driver"),
                "gpu_memory_total_mb": gpu.get("memory_total_mb"), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                "versions": found}

    def write_plan(self) -> None:
        print(P.format_plan(self.steps, self.budget.total_s), flush=True)
        _write_json(self.out / "00-plan.json", {
            "created": self.started, "command": self.command(), "budget_s": self.budget.total_s,
            "estimates": asdict(self.estimates),
            "steps": [s.to_json() for s in self.steps], "timeline": P.timeline(self.steps, self.budget.total_s),
            "threads": self.shares, "engines_root": str(self.root), "precision": self.args.precision,
            "environment_removed": self.removed_variables, "machine": self.machine_record})

    def command(self) -> str:
        return "python -m bench.gpu " + " ".join(self.args.argv)

    def write_summary(self, final: bool) -> dict[str, Any]:
        measured = {variant: self.measured(variant) for variant in P.VARIANTS}
        verdicts = {variant: self.verdicts(variant) for variant in P.VARIANTS}
        configurations = P.summarise_configurations({v: m for v, m in measured.items() if m}, verdicts)
        reference = self.output("07-reference")
        heads = {}
        for variant in P.VARIANTS:
            manifest = _read_json(self.engines(variant) / "manifest.json")
            if manifest:
                heads[variant] = manifest.get("models", {}).get("gdino_head", {}).get("source", {}).get(
                    "deformable_attention", "standard")
        summary = {
            "complete": final, "created": self.started, "command": self.command(),
            "budget_s": self.budget.total_s, "elapsed_s": round(self.budget.elapsed(), 1),
            **self.machine_record, "precision": self.args.precision, "weights": "random (timings only)",
            "engines_root": str(self.root), "head": {"picked": self.head, "why": self.head_why, "engines": heads},
            "sam_attention": {"picked": self.attention, "why": self.attention_why},
            "fastest": configurations["fastest"], "fastest_matching_faithful": configurations["fastest_matching"],
            "per_variant": configurations["per_variant"], "configurations": configurations["table"],
            "faithful": P.faithful(self.device).about,
            "reference": None if reference is None else {
                "configuration": self.records["07-reference"].get("configuration"),
                "variant": self.records["07-reference"].get("variant"),
                "speedup": reference.get("speedup_vs_reference"), "runtime_p50_ms": reference.get("end_to_end_p50_ms"),
                "reference_p50_ms": (reference.get("reference_stages", {}).get("total") or {}).get("reference_p50_ms"),
                "file": "07-reference.json"},
            "steps": [self.records.get(s.id, {"id": s.id, "status": "pending"}) for s in self.steps],
        }
        _write_json(self.out / "summary.json", summary)
        return summary

    def execute(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.machine_record = self.machine()
        self.write_plan()
        interrupted = False
        try:
            if self.export:
                self.start_export("vit_b")
            self.deformable()
            self.sam_attention()
            if self.export and any(s.id == "00-export-vit_h" for s in self.steps):
                self.start_export("vit_h")  # with step 2's pick; its own part ends before the ViT-B export does
            for variant in P.VARIANTS:
                self.measure(variant)
            self.reference()
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: what was measured is kept", flush=True)
        finally:
            self.stop_exports()
        summary = self.write_summary(final=not interrupted)
        print(format_summary(summary), flush=True)
        return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['device_name']} ({summary['device']}, driver {summary['driver']}), {summary['precision']} "
             f"engines, {summary['weights']}; {summary['elapsed_s']:.0f} s of a {summary['budget_s']:.0f} s budget"]
    for row in summary["configurations"]:
        verdict = {True: "matches the faithful path", False: "differs", None: "not compared"}[row["matches_faithful"]]
        lines.append(f"  {row['variant']:6s} {row['configuration']:32s} p50 {row['p50_ms'] or float('nan'):8.1f} ms  {verdict}")
    for key, label in (("fastest", "fastest"), ("fastest_matching_faithful", "fastest matching the faithful path")):
        row = summary[key]
        lines.append(f"{label}: " + (f"{row['variant']} {row['configuration']} {row['p50_ms']:.1f} ms" if row else "none"))
    if summary["reference"]:
        lines.append(f"against the PyTorch reference: {summary['reference']['speedup']}x "
                     f"({summary['reference']['variant']} {summary['reference']['configuration']})")
    skipped = [s for s in summary["steps"] if s.get("status") not in ("done", None)]
    for step in skipped:
        lines.append(f"  {step['id']}: {step['status']}" + (f" ({step['reason']})" if step.get("reason") else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for every step's JSON, the logs and summary.json")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds the whole run may take (default {DEFAULT_BUDGET_S:.0f}); steps that would "
                             "pass it are skipped")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (onnxruntime-gpu); cpu rehearses every step, with the GPU paths on the CPU provider")
    parser.add_argument("--skip-export", action="store_true",
                        help="use the engines already in --engines-root (engines-vit_b/, engines-vit_h/)")
    parser.add_argument("--engines-root", default=str(DEFAULT_ENGINES_ROOT),
                        help=f"where the engines dirs go, or are with --skip-export (default {DEFAULT_ENGINES_ROOT})")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny engines and small layers (a rehearsal: export --tiny --detector-size 224x224)")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="of the exported engines")
    parser.add_argument("--iters", type=int, default=LATENCY_ITERS, help=f"timed calls per configuration ({LATENCY_ITERS})")
    parser.add_argument("--plan", action="store_true", help="print the plan and its timeline, run nothing")
    parser.add_argument("--force", action="store_true", help="write into an --out that holds an earlier run's files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.budget_s <= 0 or args.iters < 1:
        parser.error("--budget-s must be positive and --iters at least 1")
    if args.plan:
        estimates = P.TINY if args.tiny else P.FULL_SIZE
        print(P.format_plan(P.make_plan(estimates, args.device, export=not args.skip_export), args.budget_s))
        return 0
    problem = preflight(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    summary = BenchRun(args).execute()
    return 0 if any(s.get("status") == "done" for s in summary["steps"]) else 1


def preflight(args: argparse.Namespace) -> str | None:
    """What makes the whole run impossible, said before any minute is spent."""
    import importlib.util

    import onnxruntime

    if args.device == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return ("this onnxruntime has no CUDAExecutionProvider (available: "
                    f"{', '.join(onnxruntime.get_available_providers())}): pip uninstall -y onnxruntime, then "
                    "pip install onnxruntime-gpu (bench/gpu/README.md)")
        # onnxruntime falls back to the CPU, with a logged error only, where the CUDA libraries do not load
        from runtime.engine.sessions import builtin_graph_session

        providers = builtin_graph_session("mask_sums", "cuda").get_providers()
        if "CUDAExecutionProvider" not in providers:
            return (f"a CUDA session opened on {providers} only: onnxruntime-gpu found no usable CUDA/cuDNN; "
                    "install the CUDA and cuDNN versions this onnxruntime-gpu is built for (bench/gpu/README.md)")
    if not args.skip_export:
        missing = [name for name in ("torch", "transformers", "segment_anything", "timm")
                   if importlib.util.find_spec(name) is None]
        if missing:
            return f"the exports need {', '.join(missing)}: pip install -e '.[export]', or --skip-export --engines-root DIR"
    if (Path(args.out) / "summary.json").is_file() and not args.force:
        return f"{args.out} holds an earlier run (summary.json): give another --out, or --force to write over it"
    if args.skip_export and not (Path(args.engines_root) / ENGINE_DIR.format(variant="vit_b") / "manifest.json").is_file():
        return f"--skip-export: no engines at {Path(args.engines_root) / ENGINE_DIR.format(variant='vit_b')}"
    return None
