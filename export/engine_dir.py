"""Write a complete engines dir: models per profile, tokenizer, manifest; atomically.

With --reuse-from another engines dir, only SAM is exported: GroundingDINO, the tokenizer and the
saliency CNN are hard-linked (else copied) from that dir, their manifest entries carried as they
are (take_reused), so a ViT-H dir beside a ViT-B one costs no second GroundingDINO export.

Everything is written into a temporary folder beside the target and moved into
place at the end, manifest last, so an interrupted export never leaves a folder
that looks valid.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from runtime import manifest as mf
from runtime.errors import SaaError

from .common import OPSET, ExportedModel, ExportError, limit_cpu_threads


_START = time.monotonic()


def _log(message: str) -> None:
    """A progress line with the seconds since the export began (long exports are planned by them)."""
    print(f"[{time.monotonic() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "opset": str(OPSET), "format_version": str(mf.FORMAT_VERSION)}
    for package in ("torch", "onnx", "onnxruntime", "transformers", "timm", "segment-anything"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def check_target(out: Path, force: bool) -> None:
    """Refuse to clobber something that is not ours, or ours without --force."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir():
        existing = [p for p in out.iterdir() if p.name != "README.md" and not p.name.startswith(".")]
        manifest = out / mf.MANIFEST_NAME
        if manifest.is_file() and not force:
            try:
                old = json.loads(manifest.read_text())
                what = f"format_version {old.get('format_version')}, profile {old.get('profile')}"
            except (OSError, ValueError):
                what = "an unreadable manifest"
            raise ExportError(f"{out} already holds engines ({what}); pass --force to replace them")
        if existing and not manifest.is_file():
            raise ExportError(f"{out} is not empty and holds no {mf.MANIFEST_NAME}: refusing to write engines into it")
    parent = out.parent if out.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".saa-write-test-")
        probe.close()
    except OSError as err:
        raise ExportError(f"cannot write to {parent}: {err.strerror}") from None


def _install(tmp: Path, out: Path) -> Path:
    """Move the finished files from tmp into out; the old manifest goes first, the new one last."""
    out.mkdir(parents=True, exist_ok=True)
    old_manifest = out / mf.MANIFEST_NAME
    if old_manifest.is_file():
        try:
            old = json.loads(old_manifest.read_text())
            old_entries = list(old.get("models", {}).values()) + list(old.get("files", {}).values())
            old_files = [e["file"] for e in old_entries]
            old_files += [x["file"] for e in old_entries for x in e.get("external_data", [])]
        except (OSError, ValueError, KeyError, TypeError):
            old_files = []
        old_manifest.unlink()
        for name in old_files:
            (out / name).unlink(missing_ok=True)
    for path in sorted(tmp.iterdir()):
        if path.name != mf.MANIFEST_NAME:
            shutil.move(str(path), str(out / path.name))
    shutil.move(str(tmp / mf.MANIFEST_NAME), str(out / mf.MANIFEST_NAME))
    return out / mf.MANIFEST_NAME


def _weights_source(checkpoint: str | None, random_init: bool, **preset: Any) -> dict[str, Any]:
    """How a model's weights were made, so bench.reference can rebuild the same torch model."""
    from .checkpoints import checkpoint_record

    kind = "random_init" if random_init else ("checkpoint" if checkpoint else "official")
    return {**preset, "random_init": bool(random_init),
            "checkpoint": checkpoint_record(Path(checkpoint) if checkpoint else None, kind)}


def _gdino_damping(args: argparse.Namespace) -> dict[str, Any]:
    """The score damping a random full-size GroundingDINO got (export.gdino.damp_scores)."""
    if not args.random_init or args.tiny:
        return {}
    from .gdino import RANDOM_FULL_SIZE_DAMPING

    return {"score_damping": dict(RANDOM_FULL_SIZE_DAMPING)}


def deformable_attention(args: argparse.Namespace) -> str:
    """The head's deformable-attention form: as asked, else "fused" (the runtime's custom op, compiled
    at install), or "standard" with --trt (TensorRT has no plugin for the custom op)."""
    return getattr(args, "deformable_attention", None) or ("standard" if getattr(args, "trt", False) else "fused")


# Flags that only shape GroundingDINO, SAM or the full profile's saliency CNN. With lite they would
# be silently unused, and --random-init / --tiny would even be written into a lite manifest whose
# EfficientNet-Lite0 has its real, full-size weights.
FULL_ONLY_FLAGS = (
    ("--gdino-checkpoint", "gdino_checkpoint"), ("--sam-checkpoint", "sam_checkpoint"), ("--tokenizer-zip", "tokenizer_zip"),
    ("--random-init", "random_init"), ("--tiny", "tiny"), ("--sam-variant", "sam_variant"),
    ("--sam-attention", "sam_attention"), ("--deformable-attention", "deformable_attention"),
    ("--detector-size", "detector_size"), ("--saliency-checkpoint", "saliency_checkpoint"),
)
FULL_DEFAULTS = {"sam_variant": "vit_h", "sam_attention": "plain", "detector_size": (800, 800)}


def check_profile_flags(args: argparse.Namespace) -> None:
    """Refuse, before any work, flags the chosen profile would ignore."""
    if args.profile != "lite":
        return
    unused = [flag for flag, key in FULL_ONLY_FLAGS if getattr(args, key, None)]
    if unused:
        raise ExportError(f"{', '.join(unused)}: only the full profile uses them (lite exports the "
                          "EfficientNet-Lite0 saliency CNN alone, with its real ImageNet weights)")
    backbone = getattr(args, "saliency_backbone", None)
    if backbone not in (None, "efficientnet_lite0"):
        raise ExportError(f"--saliency-backbone {backbone}: the lite profile's saliency CNN is always "
                          "efficientnet_lite0 (use --profile full for another backbone)")


def apply_full_defaults(args: argparse.Namespace) -> None:
    """The full profile's defaults for flags left unset (unset on the command line so that
    check_profile_flags can tell a flag given for lite from its default)."""
    for key, value in FULL_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


# --reuse-from: what a SAM-only export takes from another engines dir, and the flags that would
# shape what it takes (unused there, so refused).
REUSED_MODELS = (mf.GDINO_TEXT, mf.GDINO_IMAGE, mf.GDINO_HEAD, mf.SALIENCY)
REUSED_FILES = ("tokenizer",)
REUSED_PREPROCESS = ("gdino", "saliency")
REUSE_UNUSED_FLAGS = (("--gdino-checkpoint", "gdino_checkpoint"), ("--saliency-checkpoint", "saliency_checkpoint"),
                      ("--tokenizer-zip", "tokenizer_zip"), ("--trt", "trt"))
# Flags a reused dir must agree with where given (left out: the reused dir's own).
REUSE_MATCHED_FLAGS = (("--detector-size", "detector_size"), ("--deformable-attention", "deformable_attention"),
                       ("--saliency-backbone", "saliency_backbone"))


def check_reuse_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """With --reuse-from (before the full profile's defaults fill the flags in): refuse what it would
    leave unused; the matched flags as given (None: not given). None without --reuse-from."""
    source = getattr(args, "reuse_from", None)
    if not source:
        if getattr(args, "reuse_wait", 0.0):
            raise ExportError("--reuse-wait needs --reuse-from")
        return None
    if args.profile != "full":
        raise ExportError("--reuse-from: only the full profile takes models from another engines dir")
    unused = [flag for flag, key in REUSE_UNUSED_FLAGS if getattr(args, key, None)]
    if unused:
        raise ExportError(f"{', '.join(unused)} with --reuse-from {source}: GroundingDINO, the tokenizer and the "
                          "saliency CNN come from that engines dir, so they would be unused")
    if not getattr(args, "reuse_wait", 0.0) >= 0:
        raise ExportError(f"--reuse-wait must be 0 or more seconds, got {args.reuse_wait}")
    if Path(source).resolve() == Path(args.out).resolve():
        raise ExportError(f"--reuse-from {source} is the --out dir itself")
    return {key: getattr(args, key, None) for _, key in REUSE_MATCHED_FLAGS}


def reuse_source(args: argparse.Namespace, given: dict[str, Any], verify_hashes: bool = False) -> mf.Manifest:
    """The --reuse-from dir's manifest, checked against this export: ExportError naming what differs."""
    source = Path(args.reuse_from)
    try:
        manifest = mf.load_manifest(source, verify_hashes=verify_hashes)
    except SaaError as err:
        raise ExportError(f"--reuse-from: {err}") from None
    data = manifest.data
    if data.get("profile") != "full":
        raise ExportError(f"--reuse-from {source}: its profile is {data.get('profile')}, not full (no GroundingDINO to take)")
    head = manifest.models[mf.GDINO_HEAD].get("source", {})
    gdino = manifest.preprocess.get("gdino", {})
    theirs_ours = [
        ("size", data.get("size"), "tiny" if args.tiny else "full", "--tiny (or neither)"),
        ("precision", data.get("precision", "fp32"), getattr(args, "precision", "fp32"), "--precision"),
        ("random_init", bool(data.get("random_init")), bool(args.random_init), "--random-init (or neither)"),
    ]
    if given.get("detector_size") is not None:
        theirs_ours.append(("detector size", f"{gdino.get('height')}x{gdino.get('width')}",
                            "{}x{}".format(*given["detector_size"]), "--detector-size"))
    if given.get("deformable_attention") is not None:
        theirs_ours.append(("deformable attention", head.get("deformable_attention", "standard"),
                            given["deformable_attention"], "--deformable-attention"))
    if given.get("saliency_backbone") is not None:
        theirs_ours.append(("saliency backbone", manifest.preprocess.get("saliency", {}).get("backbone"),
                            given["saliency_backbone"], "--saliency-backbone"))
    for what, theirs, ours, flag in theirs_ours:
        if theirs != ours:
            raise ExportError(f"--reuse-from {source}: its {what} is {theirs}, this export's {ours}; export both "
                              f"with the same {flag}, or this one without --reuse-from")
    return manifest


def _wait_for_manifest(source: Path, seconds: float) -> None:
    """Poll for `source`'s manifest (the export writing it moves the manifest in last)."""
    deadline = time.monotonic() + seconds
    if not (source / mf.MANIFEST_NAME).is_file():
        _log(f"[reuse] waiting up to {seconds:.0f} s for {source / mf.MANIFEST_NAME}")
    while not (source / mf.MANIFEST_NAME).is_file():
        if time.monotonic() > deadline:
            raise ExportError(f"--reuse-from {source}: no {mf.MANIFEST_NAME} after waiting {seconds:.0f} s "
                              "(--reuse-wait); is its export running?")
        time.sleep(1.0)


def _link_or_copy(source: Path, target: Path) -> str:
    try:
        os.link(source, target)
        return "linked"
    except OSError:  # another file system, or links refused
        shutil.copy2(source, target)
        return "copied"


def take_reused(tmp: Path, args: argparse.Namespace, given: dict[str, Any]) -> dict[str, Any]:
    """Link (else copy) the --reuse-from dir's GroundingDINO, tokenizer and saliency files into tmp;
    their manifest entries (sha256 checked on the taken files), preprocess sections and a record."""
    source = Path(args.reuse_from)
    _wait_for_manifest(source, getattr(args, "reuse_wait", 0.0))
    manifest = reuse_source(args, given)
    entries = {name: json.loads(json.dumps(manifest.models[name])) for name in REUSED_MODELS}
    files = {name: dict(manifest.data["files"][name]) for name in REUSED_FILES if name in manifest.data.get("files", {})}
    how = set()
    for entry in [*entries.values(), *files.values()]:
        for item in [entry, *entry.get("external_data", [])]:
            target = tmp / item["file"]
            how.add(_link_or_copy(source / item["file"], target))
            if mf.sha256_of(target) != item["sha256"]:
                raise ExportError(f"--reuse-from: {source / item['file']} fails its sha256 check (re-export {source})")
    _log(f"[reuse] took {', '.join(entries)} and {', '.join(files) or 'no files'} from {source} ({' and '.join(sorted(how))})")
    return {
        "models": entries, "files": files,
        "preprocess": {key: manifest.preprocess[key] for key in REUSED_PREPROCESS if key in manifest.preprocess},
        "record": {"engines": str(source.resolve()), "models": list(entries), "files": list(files),
                   "created": manifest.data.get("created"), "parity_checks": manifest.data.get("parity_checks", "full"),
                   "versions": manifest.data.get("versions", {})},
    }


def export_engines(args: argparse.Namespace) -> Path:
    global _START
    _START = time.monotonic()
    out = Path(args.out)
    check_target(out, args.force)
    check_profile_flags(args)
    reuse = check_reuse_flags(args)
    if reuse is not None and (Path(args.reuse_from) / mf.MANIFEST_NAME).is_file():
        reuse_source(args, reuse)  # a dir that does not fit is refused before minutes of SAM export
    elif reuse is not None and not getattr(args, "reuse_wait", 0.0):
        raise ExportError(f"--reuse-from {args.reuse_from}: no {mf.MANIFEST_NAME} there (give --reuse-wait SECONDS "
                          "where its export is still running)")
    apply_full_defaults(args)
    if getattr(args, "threads", None) is not None:
        limit_cpu_threads(args.threads)
    if getattr(args, "trt", False):
        from .tensorrt import require_tensorrt

        if getattr(args, "deformable_attention", None) == "fused":
            raise ExportError("--trt with --deformable-attention fused: TensorRT has no plugin for the runtime's "
                              "custom op saa.edge::MultiScaleDeformableAttention; use --deformable-attention standard "
                              "with --trt (onnxruntime's TensorRT provider runs a fused head, the op on CUDA)")

        require_tensorrt()  # before minutes of export work
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if str(out.parent) else "."))
    try:
        manifest = _export_into(tmp, args, reuse)
        (tmp / mf.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        return _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_into(tmp: Path, args: argparse.Namespace, reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """reuse (check_reuse_flags' answer, with --reuse-from): SAM only is exported; the rest is taken."""
    import torch

    torch.manual_seed(0)  # random-init exports are reproducible
    models: list[ExportedModel] = []
    preprocess: dict[str, Any] = {}
    files: dict[str, dict[str, Any]] = {}
    size = "tiny" if args.tiny else "full"

    if args.profile == "full" and reuse is None:
        from . import gdino

        _log("[GroundingDINO] building" + (" (random weights)" if args.random_init else ""))
        detector = gdino.build_grounding_dino("tiny" if args.tiny else "swin-t", args.gdino_checkpoint, args.random_init)
        tokenizer = gdino.copy_tokenizer(tmp, getattr(args, "tokenizer_zip", None))
        files["tokenizer"] = {"file": tokenizer.name}
        _log(f"[GroundingDINO] exporting at {args.detector_size[0]}x{args.detector_size[1]} and checking parity")
        models += gdino.export_grounding_dino(detector, tmp, args.detector_size, tokenizer,
                                              source=_weights_source(args.gdino_checkpoint, args.random_init,
                                                                     size="tiny" if args.tiny else "swin-t", seed=0,
                                                                     **_gdino_damping(args)),
                                              parity=getattr(args, "parity", "full"),
                                              deformable_attention=deformable_attention(args))
        short_side, max_side = gdino.REFERENCE_SIDES["tiny" if args.tiny else "swin-t"]
        preprocess["gdino"] = gdino.preprocess_record(args.detector_size, detector, short_side, max_side)
        del detector

    if args.profile == "full":
        from . import sam

        variant = "tiny" if args.tiny else args.sam_variant
        _log(f"[SAM {variant}] building")
        segmenter = sam.build_sam(variant, args.sam_checkpoint, args.random_init)
        _log(f"[SAM {variant}] exporting encoder and batched-box decoder, checking parity")
        models += sam.export_sam(segmenter, tmp, source=_weights_source(args.sam_checkpoint, args.random_init,
                                                                        variant=variant, seed=sam.RANDOM_INIT_SEED),
                                 attention=getattr(args, "sam_attention", "plain"))
        preprocess["sam"] = sam.preprocess_record(variant)
        del segmenter

    if reuse is None:
        from . import saliency

        backbone = "efficientnet_lite0" if args.profile == "lite" else (args.saliency_backbone or "wide_resnet50_2")
        _log(f"[saliency {backbone}] building")
        cnn = saliency.build_saliency_cnn(backbone, args.saliency_checkpoint,
                                          args.random_init and backbone != "efficientnet_lite0",
                                          tiny=args.tiny and backbone != "efficientnet_lite0")
        _log(f"[saliency {backbone}] exporting and checking parity")
        exported = saliency.export_saliency(cnn, tmp, backbone)
        models += exported
        preprocess["saliency"] = saliency.preprocess_record(backbone, cnn)

    # Precision and TensorRT steps run on the finished fp32 graphs (export.common).
    precision = getattr(args, "precision", "fp32")
    if precision == "fp16":
        from .precision import convert_engines_fp16

        _log("[precision] converting to fp16, measuring fp16 vs fp32")
        convert_engines_fp16(tmp, models)
    if getattr(args, "trt", False):
        from .tensorrt import build_trt_engines

        _log("[TensorRT] building plans")
        files.update(build_trt_engines(tmp, models, fp16=precision == "fp16"))

    taken = take_reused(tmp, args, reuse) if reuse is not None else None  # after SAM: its export may still run
    if taken is not None:
        files.update(taken["files"])
        preprocess = {**taken["preprocess"], **preprocess}
    for entry in files.values():
        entry["sha256"] = mf.sha256_of(tmp / entry["file"])
    entries = {}
    for model in models:
        entry = model.manifest_entry()
        entry["sha256"] = mf.sha256_of(tmp / model.file)
        entry["size_bytes"] = (tmp / model.file).stat().st_size
        # Graphs over 2 GB (SAM ViT-H) keep their weights in a side file: it is hashed and shipped too.
        side = tmp / (model.file + ".data")
        if side.is_file():
            entry["external_data"] = [{"file": side.name, "sha256": mf.sha256_of(side)}]
        entries[model.name] = entry
    parity_checks = getattr(args, "parity", "full")
    if taken is not None:  # the manifest's usual order; the taken models' entries as they were
        entries = {name: taken["models"].get(name) or entries[name] for name in mf.PROFILE_MODELS["full"]}
        preprocess = {key: preprocess[key] for key in ("gdino", "sam", "saliency")}
        if taken["record"]["parity_checks"] != parity_checks:
            parity_checks = "quick"  # the fewer cases of the two (each model's parity record lists its own)
    manifest = {
        "format_version": mf.FORMAT_VERSION,
        "profile": args.profile,
        "size": size,
        "random_init": bool(args.random_init),
        "precision": precision,
        "parity_checks": parity_checks,  # export --parity: how many cases each graph was checked on
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "models": entries,
        "files": files,
        "preprocess": preprocess,
    }
    if taken is not None:
        manifest["reused_from"] = taken["record"]
    return manifest
