"""The plan of `python -m bench.gpu`: its steps in order, what each is estimated to take, the
budget that decides which run, and the decisions one step's results make for the next ones.

Nothing here starts a process (bench/gpu/run.py does), so the tests run all of it in a moment.
The estimates are for a machine with one GPU and about 16 CPU cores running full-size
random-weight engines, from the runs recorded in bench/results (the export logs in
bench/results/runs, the latency records); each step's record gives its estimate beside its
wall time, so the table can be tuned from any run.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

VARIANTS = ("vit_b", "vit_h")
HEAD_FORMS = ("fused", "standard")
SAM_ATTENTIONS = ("plain", "mha", "augmented")
# A form must be this much faster than the default one to be picked (timings vary by a few percent).
PICK_MARGIN = 0.03
# Largest difference between the forms of one layer, relative to the output's scale (at least 1):
# fp32 layers agree to float32 rounding, fp16 ones (SAM's encoder on a GPU) to fp16 rounding.
FORM_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# The compare step's verdict (bench/gpu/compare.py): every image keeps the faithful run's fused
# regions (same prompt, box IoU >= 0.5), and at most this share of the map's pixels differs by
# more than 1e-4 (bench.compare_engines counts them).
MATCH_PIXEL_SHARE = 0.005


@dataclass(frozen=True)
class Estimates:
    """Seconds per step (the exports: the whole export; compare: per pipeline opened and run)."""

    export_vit_b: float  # GroundingDINO + SAM ViT-B + the saliency CNN (+ fp16 conversion)
    export_vit_h: float  # SAM ViT-H alone (--reuse-from the ViT-B dir), beside the ViT-B export
    deformable: float
    sam_attention: float
    latency: float  # open the pipeline, warm up, the timed calls
    compare_pipeline: float
    kernels: float
    reference: float


# Full size on one GPU and 16 cores. Exports with --parity quick, each with its share of the CPUs
# (bench/results/runs: GroundingDINO took 258 s on 16 cores while another export took all 16 too,
# 68 s alone on 2 cores with --parity quick; SAM ViT-B 28-35 s, ViT-H 80 s; the saliency CNN 6 s;
# the fp16 conversion and its check 50 s for ViT-B on 2 cores). A latency run with CUDA graphs took
# 12-15 s on an H200 once its sessions were open (about 15 s more); with the reference 66 s; a
# kernel profile 16 s.
FULL_SIZE = Estimates(export_vit_b=180, export_vit_h=150, deformable=45, sam_attention=35, latency=30,
                      compare_pipeline=20, kernels=25, reference=90)
# Tiny engines on a CPU (`--device cpu --tiny`: the rehearsal of every step; 2 cores).
TINY = Estimates(export_vit_b=25, export_vit_h=20, deformable=30, sam_attention=25, latency=25,
                 compare_pipeline=12, kernels=30, reference=90)


@dataclass(frozen=True)
class Configuration:
    """How the runtime runs for one measurement: EngineSettings fields (besides the device) and the
    prompt config's algorithm options."""

    name: str
    settings: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    about: str = ""

    @property
    def joined(self) -> bool:
        return bool(self.options.get("joined_captions"))


def rehearsal_switches(device: str) -> dict[str, Any]:
    """On a CPU the GPU code paths (IO binding, fixed shapes) are forced on the CPU provider, so a
    rehearsal runs every switch the GPU run does (CUDA graphs then mean fixed buffers only)."""
    return {"io_binding": True, "static_shapes": True} if device == "cpu" else {}


def faithful(device: str) -> Configuration:
    """What every configuration is compared with: the authors' algorithm as the runtime runs it by
    default, one head run per caption, fp32 matmuls (TF32 off), no CUDA graphs, no overlap."""
    return Configuration("faithful", rehearsal_switches(device), {}, "per caption, TF32 off, no CUDA graphs")


def configurations(device: str) -> list[Configuration]:
    """Steps 3 and 4 (and 6, for ViT-H), in the order they run."""
    base = rehearsal_switches(device)
    all_on = {**base, "cuda_graphs": True, "overlap": True, "device_canvas": True}
    return [
        Configuration("per-caption-cuda-graphs", {**base, "cuda_graphs": True}, {},
                      "the authors' algorithm with CUDA graphs"),
        Configuration("joined-all-on", {**all_on, "cuda_tf32": "head"}, {"joined_captions": True},
                      "one head run for every caption, every switch on, TF32 in the head"),
        Configuration("per-caption-all-on-tf32-head", {**all_on, "cuda_tf32": "head"}, {},
                      "per caption, every switch on, TF32 in the head"),
        Configuration("per-caption-all-on", all_on, {},
                      "per caption, every switch on, fp32 matmuls"),
    ]


@dataclass(frozen=True)
class Step:
    id: str  # also its record's file name: <id>.json
    kind: str  # export, deformable, sam_attention, latency, compare, kernels, reference
    estimate_s: float
    variant: str | None = None
    configuration: Configuration | None = None
    reserve_s: float = 0.0  # time it must leave for a later step that matters more (ViT-H: the reference)
    about: str = ""

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["configuration"] = asdict(self.configuration) if self.configuration else None
        return record


def make_plan(estimates: Estimates, device: str, export: bool = True,
              variants: Sequence[str] = VARIANTS) -> list[Step]:
    """Every step in the order it runs. The exports run beside steps 1 and 2; the measurements
    of a variant wait for its engines."""
    steps: list[Step] = []
    if export:
        steps.append(Step("00-export-vit_b", "export", estimates.export_vit_b, "vit_b",
                          about="GroundingDINO, SAM ViT-B and the saliency CNN, started at once"))
        if "vit_h" in variants:
            steps.append(Step("00-export-vit_h", "export", estimates.export_vit_h, "vit_h",
                              about="SAM ViT-H alone after step 2, the rest taken from the ViT-B dir"))
    steps.append(Step("01-deformable", "deformable", estimates.deformable,
                      about="the fused deformable-attention op against its CPU kernel and the per-point form; "
                            "picks the head for the later steps"))
    steps.append(Step("02-sam-attention", "sam_attention", estimates.sam_attention,
                      about="SAM's encoder attention forms; picks the ViT-H export's"))
    for variant in variants:
        prefix = ("03", "04", "05") if variant == "vit_b" else ("06", "06", "06")
        reserve = estimates.reference if variant != "vit_b" else 0.0  # ViT-H where time allows
        for index, configuration in enumerate(configurations(device)):
            number = prefix[0] if index == 0 else prefix[1]
            steps.append(Step(f"{number}-{variant}-{configuration.name}", "latency", estimates.latency, variant,
                              configuration, reserve, f"step {int(number)} ({variant}): {configuration.about}"))
        # The faithful run and the configurations fastest first up to the first match: two or three
        # pipelines as a rule (it starts where two fit: run.py).
        steps.append(Step(f"{prefix[1]}-{variant}-compare", "compare", estimates.compare_pipeline * 3, variant,
                          reserve_s=reserve, about="the configurations, fastest first, against the faithful path"))
        steps.append(Step(f"{prefix[2]}-{variant}-kernels", "kernels", estimates.kernels, variant, reserve_s=reserve,
                          about="every CUDA kernel's device time per stage, of the fastest configuration"))
    steps.append(Step("07-reference", "reference", estimates.reference,
                      about="the PyTorch reference beside the fastest configuration (joined where it is)"))
    return steps


def timeline(steps: Sequence[Step], budget_s: float) -> list[dict[str, Any]]:
    """When each step is expected to start and end, and whether the budget is expected to take it.
    The exports and steps 1-2 run side by side; the measurements follow the ViT-B export."""
    rows: list[dict[str, Any]] = []
    exports = {s.variant: s for s in steps if s.kind == "export"}
    side = 0.0
    for step in steps:
        if step.kind == "export":
            start = 0.0 if step.variant == "vit_b" else None  # after step 2 (set below)
        elif step.kind in ("deformable", "sam_attention"):
            start = side
            side += step.estimate_s
        else:
            continue
        rows.append({"step": step.id, "start_s": start, "end_s": None if start is None else start + step.estimate_s})
    for row in rows:
        if row["start_s"] is None:  # the ViT-H export: after step 2, done no sooner than the ViT-B one it takes from
            row["start_s"] = side
            row["end_s"] = max(side + exports["vit_h"].estimate_s, exports["vit_b"].estimate_s if "vit_b" in exports else 0)
    clock = max([side] + [row["end_s"] for row in rows if row["step"] == "00-export-vit_b"])
    vit_h_ready = max([0.0] + [row["end_s"] for row in rows if row["step"] == "00-export-vit_h"])
    for step in steps:
        if step.kind in ("export", "deformable", "sam_attention"):
            continue
        if step.variant == "vit_h":
            clock = max(clock, vit_h_ready)
        fits = clock + step.estimate_s + step.reserve_s <= budget_s
        rows.append({"step": step.id, "start_s": clock, "end_s": clock + step.estimate_s, "expected": "runs" if fits
                     else "skipped (over the budget)"})
        if fits:
            clock += step.estimate_s
    for row in rows:
        row.setdefault("expected", "runs" if row["end_s"] <= budget_s else "cut short by the budget")
        row["start_s"], row["end_s"] = round(row["start_s"]), round(row["end_s"])
    return rows


def format_plan(steps: Sequence[Step], budget_s: float) -> str:
    """The plan as a person reads it before the run."""
    by_id = {s.id: s for s in steps}
    lines = [f"budget {budget_s:.0f} s; estimated start and end of each step (s from the start):"]
    for row in timeline(steps, budget_s):
        step = by_id[row["step"]]
        lines.append(f"  {row['start_s']:>4} - {row['end_s']:>4}  {step.id:<44} {row['expected']}")
    return "\n".join(lines)


class Budget:
    """The seconds left of `total_s`, on `clock` (time.monotonic; a test's fake clock)."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s = float(total_s)
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def skip_reason(self, step: Step) -> str | None:
        """Why `step` is not started now (None: it fits): its estimate, and the time it must leave
        for the reference where it has a reserve, beyond what is left."""
        left = self.left()
        if step.estimate_s + step.reserve_s <= left:
            return None
        reserve = f" and leave ~{step.reserve_s:.0f} s for the reference" if step.reserve_s else ""
        return (f"out of budget: needs ~{step.estimate_s:.0f} s{reserve}, {max(left, 0):.0f} s of "
                f"{self.total_s:.0f} s left")

    def timeout_for(self, step: Step) -> float:
        """How long `step` may run: well past its estimate, never past the budget (less its reserve)."""
        return max(1.0, min(max(3.0 * step.estimate_s, step.estimate_s + 60.0), self.left() - step.reserve_s))


# ---------------------------------------------------------------------------------- decisions


def _agrees(row: dict[str, Any], precision: str, scale: float) -> bool:
    diff = row.get("max_abs_diff")
    return diff is not None and diff <= FORM_TOLERANCE.get(precision, 1e-4) * max(1.0, scale)


def pick_head(report: dict[str, Any] | None) -> tuple[str, str]:
    """Step 1 -> the head's deformable-attention form for the later steps ("fused" or "standard"),
    and why. The fused op is kept where it ran, agrees with the per-point form (and on a GPU its
    CUDA kernel with its CPU kernel, on the layer and on the pipeline's own check) and is no
    slower than the per-point form; else the standard form."""
    case = (report or {}).get("cases", {}).get("deformable_sum")
    if not case:
        return "fused", "step 1 did not run: the export's default (a pipeline whose CUDA kernel is wrong runs the op on the CPU)"
    forms, scale, precision = case.get("forms", {}), case.get("output_scale", 1.0), case.get("precision", "fp32")
    fused, per_point = forms.get("fused", {}), forms.get("per_point", {})
    check = case.get("kernel_check", {})
    if "p50_ms" not in fused:
        return "standard", f"the fused op did not run ({fused.get('failed') or 'no op library built'})"
    if check.get("fallback"):
        return "standard", f"the pipeline's check of the CUDA kernel failed: {check['fallback']}"
    if not _agrees(fused, precision, scale):
        return "standard", (f"the fused op differs from the per-point form by {fused.get('max_abs_diff')} "
                            f"(output scale {scale:.3g})")
    cpu_kernel = case.get("cuda_vs_cpu_kernel_max_abs_diff")
    if cpu_kernel is not None and not cpu_kernel <= FORM_TOLERANCE["fp32"] * max(1.0, scale):
        return "standard", f"the CUDA kernel differs from the CPU kernel by {cpu_kernel:.3g} on the full-size layer"
    if "p50_ms" in per_point and fused["p50_ms"] > per_point["p50_ms"]:
        return "standard", f"the fused op took {fused['p50_ms']} ms a layer, the per-point form {per_point['p50_ms']} ms"
    against = f" against {per_point['p50_ms']} ms per point" if "p50_ms" in per_point else ""
    graph = fused.get("cuda_graph")
    return "fused", (f"{fused['p50_ms']} ms a layer{against}, agreeing to {fused['max_abs_diff']:.2g}"
                     + (f"; CUDA graph: {graph}" if graph else ""))


def pick_sam_attention(report: dict[str, Any] | None) -> tuple[str, str]:
    """Step 2 -> SAM's encoder attention form for the exports still to start: the fastest form
    that agrees with the plain one, where it is at least PICK_MARGIN faster; else "plain"."""
    case = (report or {}).get("cases", {}).get("sam_attention")
    if not case:
        return "plain", "step 2 did not run: the export's default"
    forms, scale, precision = case.get("forms", {}), case.get("output_scale", 1.0), case.get("precision", "fp32")
    plain = forms.get("plain", {})
    if "p50_ms" not in plain:
        return "plain", "the plain form was not timed"
    best, best_ms = "plain", plain["p50_ms"]
    for form in SAM_ATTENTIONS[1:]:
        row = forms.get(form, {})
        if "p50_ms" in row and _agrees(row, precision, scale) and row["p50_ms"] < best_ms * (1 - PICK_MARGIN):
            best, best_ms = form, row["p50_ms"]
    timings = ", ".join(f"{form} {row['p50_ms']} ms" for form, row in forms.items() if "p50_ms" in row)
    return best, f"{timings} a block ({precision})"


def fastest(candidates: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured candidate (with "p50_ms") of the least p50, or None."""
    timed = [c for c in candidates if c.get("p50_ms") is not None]
    return min(timed, key=lambda c: c["p50_ms"]) if timed else None


def summarise_configurations(measured: dict[str, dict[str, dict[str, Any]]],
                             verdicts: dict[str, dict[str, bool | None]]) -> dict[str, Any]:
    """measured: variant -> configuration -> its latency figures ({"p50_ms", ...}); verdicts: variant ->
    configuration -> matches the faithful path (None: not compared). The fastest configuration, the
    fastest whose boxes and maps match the faithful path, and the table."""
    rows = []
    for variant, configs in measured.items():
        for name, figures in configs.items():
            rows.append({"variant": variant, "configuration": name, **figures,
                         "matches_faithful": verdicts.get(variant, {}).get(name)})
    rows.sort(key=lambda r: (r.get("p50_ms") is None, r.get("p50_ms") or 0.0))
    best = fastest(rows)
    matching = fastest([r for r in rows if r["matches_faithful"]])
    per_variant = {}
    for variant in measured:
        mine = [r for r in rows if r["variant"] == variant]
        per_variant[variant] = {"fastest": fastest(mine), "fastest_matching": fastest([r for r in mine if r["matches_faithful"]])}
    return {"fastest": best, "fastest_matching": matching, "per_variant": per_variant, "table": rows}
