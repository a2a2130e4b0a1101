"""Compile libsaa.so (the C ABI) with the system C compiler. Standard library only: setup.py
loads this file by path at install time, before any dependency is installed.

The library does not link libpython (see saa.c): it records the building interpreter and
its shared libpython, which a plain C/C++ host starts (SAA_PYTHON / SAA_LIBPYTHON override).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "saa.c", HERE / "saa.h", Path(__file__).resolve())
LIBRARY_NAME = "libsaa.so"


class BuildError(RuntimeError):
    """The compiler is missing or rejected saa.c; the message holds its command and output."""


def libpython_path() -> str:
    """The running interpreter's shared libpython, or "" when it is a static build without one."""
    names = [sysconfig.get_config_var(k) for k in ("INSTSONAME", "LDLIBRARY")]
    names = [n for n in names if n and ".so" in n]
    version = sysconfig.get_config_var("VERSION") or f"{sys.version_info[0]}.{sys.version_info[1]}"
    abiflags = getattr(sys, "abiflags", "")
    names += [f"libpython{version}{abiflags}.so.1.0", f"libpython{version}{abiflags}.so"]
    folders = [sysconfig.get_config_var(k) for k in ("LIBDIR", "LIBPL")]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:  # Debian/Ubuntu's static /usr/bin/python3 has its shared twin here (package libpython3.X)
        folders.append(os.path.join("/usr/lib", multiarch))
    for folder in filter(None, folders):
        for name in names:
            candidate = Path(folder) / name
            if candidate.is_file():
                return str(candidate)
    return ""


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def compile_command(output: Path, version: str, python: str | None = None, compiler: str | None = None) -> list[str]:
    compiler_words = shlex.split(compiler or os.environ.get("CC") or "cc")
    include = sysconfig.get_paths()["include"]
    return [
        *compiler_words, "-std=gnu11", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wextra",
        f"-I{include}", f"-I{HERE}",
        f"-DSAA_BUILD_PYTHON={_c_string(python or sys.executable)}",
        f"-DSAA_BUILD_LIBPYTHON={_c_string(libpython_path())}",
        f"-DSAA_PACKAGE_VERSION={_c_string(version)}",
        str(HERE / "saa.c"), "-o", str(output),
        "-Wl,-soname," + LIBRARY_NAME, "-Wl,-z,defs",  # -z defs: proves no Py* symbol is left to the linker
        "-ldl", "-pthread",
    ]


def package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("saa-edge")
    except (ImportError, PackageNotFoundError):
        return "dev"


def build_library(output: Path | None = None, version: str | None = None, python: str | None = None,
                  compiler: str | None = None) -> Path:
    """Compile saa.c into `output` (default: libsaa.so beside this file), replacing it atomically."""
    output = Path(output or HERE / LIBRARY_NAME)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    command = compile_command(partial, version or package_version(), python, compiler)
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(f"C compiler {command[0]!r} not found: install gcc (or set CC) "
                         f"to build {LIBRARY_NAME}") from None
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"building {LIBRARY_NAME} failed:\n{shlex.join(command)}\n{done.stderr.strip()}")
    os.replace(partial, output)  # a process that has the old library loaded keeps its copy
    return output


def is_stale(library: Path | None = None) -> bool:
    """True when the library is missing or older than saa.c, saa.h or this file."""
    library = Path(library or HERE / LIBRARY_NAME)
    if not library.is_file():
        return True
    built = library.stat().st_mtime
    return any(source.stat().st_mtime > built for source in SOURCES)


if __name__ == "__main__":
    print(build_library())
