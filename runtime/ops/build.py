"""Compile the onnxruntime custom-op library (saa_ops.cc, msda_cuda.cu). Standard library only:
setup.py loads this file by path at install time, before any dependency is installed.

    python -m runtime.ops.build            # libsaa_ops.so: the CPU kernel (pip install builds it)
    python -m runtime.ops.build --cuda     # libsaa_ops_cuda.so: CPU + CUDA kernels (needs nvcc; pip
                                           # install builds it too where nvcc is found, unless
                                           # SAA_BUILD_CUDA_OPS=0; a failure there only warns,
                                           # unless SAA_BUILD_CUDA_OPS=1)

The CUDA library links the CUDA runtime statically (it needs the driver, glibc 2.34 and libstdc++
where it runs) and holds code for the GPUs in CUDA_ARCHS plus PTX for newer ones.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU_LIBRARY = "libsaa_ops.so"
CUDA_LIBRARY = "libsaa_ops_cuda.so"
SOURCES = (HERE / "saa_ops.cc", HERE / "msda.h", HERE / "msda_element.h", HERE / "include" / "onnxruntime_c_api.h",
           Path(__file__).resolve())
# Turing (7.5, CUDA 13's oldest) to Hopper (9.0), Jetson Orin (8.7) included; PTX of the oldest, which
# the driver compiles for GPUs newer than the list. SAA_CUDA_ARCHS="90" (say) builds fewer.
CUDA_ARCHS = ("75", "80", "86", "87", "89", "90")


class BuildError(RuntimeError):
    """A compiler is missing or rejected the sources; the message holds its command and output."""


def _run(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(f"{command[0]!r} not found: it is needed to build {what}") from None
    if done.returncode != 0:
        raise BuildError(f"building {what} failed:\n{shlex.join(command)}\n{(done.stderr or done.stdout).strip()}")


def cpu_command(output: Path, compiler: str | None = None) -> list[str]:
    return [*shlex.split(compiler or os.environ.get("CXX") or "c++"), "-std=c++17", "-O3", "-fPIC", "-shared",
            "-fvisibility=hidden", "-Wall", "-Wextra", f"-I{HERE}", str(HERE / "saa_ops.cc"), "-o", str(output),
            "-Wl,-soname," + CPU_LIBRARY, "-Wl,-z,defs", "-pthread"]


def nvcc_path() -> str | None:
    """nvcc from CUDACXX, PATH or the usual install folders, or None."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _replace(partial: Path, output: Path) -> Path:
    os.replace(partial, output)  # a process that has the old library loaded keeps its copy
    return output


def build_cpu(output: Path | None = None, compiler: str | None = None) -> Path:
    """Compile the CPU-only library into `output` (default: beside this file), replacing it atomically.
    A compiler that refuses the per-ISA clones (saa_ops.cc's guard covers GCC 11 and Clang; others
    may differ) gets one more try without them: a slower library beats a failed install."""
    output = Path(output or HERE / CPU_LIBRARY)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        try:
            _run(cpu_command(partial, compiler), CPU_LIBRARY)
        except BuildError as first:
            if "target_clones" not in str(first) and "dispatcher" not in str(first):
                raise
            _run(cpu_command(partial, compiler) + ["-DSAA_NO_CLONES"], CPU_LIBRARY)
    except BuildError:
        partial.unlink(missing_ok=True)
        raise
    return _replace(partial, output)


def supported_archs(nvcc: str, archs: tuple[str, ...]) -> tuple[str, ...]:
    """The architectures of `archs` this nvcc can build (nvcc --list-gpu-arch, CUDA 11.0 and later;
    an older nvcc that cannot list them gets the list as it is). JetPack 5's CUDA 11.4 stops at 8.7."""
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return archs
    known = {line.strip().removeprefix("compute_") for line in listed.stdout.split() if line.startswith("compute_")}
    if listed.returncode != 0 or not known:
        return archs
    kept = tuple(arch for arch in archs if arch in known)
    if not kept:
        raise BuildError(f"{nvcc} builds none of the CUDA architectures {' '.join(archs)} (it lists "
                         f"{' '.join(sorted(known, key=int))}); set SAA_CUDA_ARCHS")
    return kept


def build_cuda(output: Path | None = None, nvcc: str | None = None, archs: tuple[str, ...] | None = None) -> Path:
    """Compile the CPU + CUDA library with nvcc into `output` (default: beside this file)."""
    archs = archs or tuple(os.environ.get("SAA_CUDA_ARCHS", "").replace(",", " ").split()) or CUDA_ARCHS
    if not all(arch.isdigit() for arch in archs):
        raise BuildError(f"CUDA architectures must be numbers such as 90 (sm_90), got {' '.join(archs)}")
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise BuildError(f"nvcc not found (set CUDACXX or put it on PATH): it is needed to build {CUDA_LIBRARY}")
    archs = supported_archs(nvcc, archs)
    output = Path(output or HERE / CUDA_LIBRARY)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[0]},code=compute_{archs[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        kernel = Path(tmp) / "msda_cuda.o"
        try:
            _run([nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", *gencode, f"-I{HERE}", "-c",
                  str(HERE / "msda_cuda.cu"), "-o", str(kernel)], CUDA_LIBRARY)
            # The CUDA runtime linked in (it is often built on one machine and carried to the GPU's);
            # libstdc++ stays shared: linked in, it asked for glibc 2.36, newer than Jetson's Ubuntu 22.04.
            _run([nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-DSAA_OPS_CUDA", f"-I{HERE}",
                  "-shared", "-cudart", "static", *gencode, str(HERE / "saa_ops.cc"), str(kernel), "-o", str(partial),
                  "-Xlinker", "-soname," + CUDA_LIBRARY], CUDA_LIBRARY)
        except BuildError:
            partial.unlink(missing_ok=True)
            raise
    return _replace(partial, output)


def is_stale(library: Path, sources: tuple[Path, ...] = SOURCES) -> bool:
    """True when the library is missing or older than any of its sources."""
    if not library.is_file():
        return True
    built = library.stat().st_mtime
    return any(source.stat().st_mtime > built for source in sources)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.ops.build", description="Build the saa.edge onnxruntime custom-op library.")
    parser.add_argument("--cuda", action="store_true", help=f"build {CUDA_LIBRARY} (CPU + CUDA kernels) with nvcc")
    parser.add_argument("--out", type=Path, help="where to write the library (default: beside the sources)")
    args = parser.parse_args(argv)
    try:
        print(build_cuda(args.out) if args.cuda else build_cpu(args.out))
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
