"""`python -m runtime.capi --cflags --libs`: what a C/C++ build needs to use libsaa.so.

    g++ my_line.cpp $(python -m runtime.capi --cflags --libs) -o my_line

--cflags gives the folder of saa.h, --libs the library with an rpath to it (no Python
flags: the library finds libpython itself). --info says which library, interpreter and
libpython a C++ program will use; --build (re)compiles the library in place.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import CapiError, header_dir, library_path, version
from .build import BuildError, build_library, is_stale


def cflags() -> list[str]:
    return [f"-I{header_dir()}"]


def libs() -> list[str]:
    folder = library_path().parent
    return [f"-L{folder}", "-lsaa", f"-Wl,-rpath,{folder}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.capi", description=__doc__.splitlines()[0])
    parser.add_argument("--cflags", action="store_true", help="compiler flags (include folder of saa.h)")
    parser.add_argument("--libs", action="store_true", help="linker flags for libsaa.so, with an rpath")
    parser.add_argument("--info", action="store_true", help="library, ABI, interpreter and overrides in effect")
    parser.add_argument("--build", action="store_true", help="compile libsaa.so in place with the system compiler")
    args = parser.parse_args(argv)
    if not (args.cflags or args.libs or args.info or args.build):
        parser.print_usage(sys.stderr)
        return 2
    try:
        if args.build:
            print(f"built {build_library()}", file=sys.stderr)
        if (args.libs or args.info) and not library_path().is_file():
            raise CapiError(None, f"{library_path()} is not built: run `pip install -e .` or "
                                  "`python -m runtime.capi --build`")
        if args.info:
            print(f"library: {library_path()}{' (older than its sources: rebuild)' if is_stale() else ''}")
            print(f"header: {header_dir() / 'saa.h'}")
            print(f"version: {version()}")
            for name in ("SAA_PYTHON", "SAA_LIBPYTHON", "SAA_VERBOSE"):
                print(f"{name}: {os.environ.get(name, '(not set)')}")
    except (CapiError, BuildError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flags = (cflags() if args.cflags else []) + (libs() if args.libs else [])
    if flags:
        print(" ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
