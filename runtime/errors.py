"""Errors the runtime raises for the user's input; each message names the file or setting at fault."""
from __future__ import annotations

import functools
import sys
import warnings
from typing import Any, Callable, TypeVar

Main = TypeVar("Main", bound=Callable[..., Any])


class SaaError(Exception):
    """Base of every error the runtime reports to a user (CLI, Python API, C ABI)."""


class ImageError(SaaError, ValueError):
    """An input image is unreadable, truncated, empty or of an unsupported layout."""


class ConfigError(SaaError, ValueError):
    """A prompt config has unknown keys or impossible values."""


class EngineError(SaaError, RuntimeError):
    """An engine failed to load or run (wrong inputs, corrupt file, provider missing)."""


class ManifestError(SaaError, ValueError):
    """The engines dir is missing, incomplete, from another version or fails its sha256 checks."""


class OutputError(SaaError, OSError):
    """An output file or folder cannot be written (missing folder, no space, no permission)."""


# What onnxruntime, CUDA, cuDNN, cuBLAS and the C++ runtime say when an allocation fails.
OUT_OF_MEMORY_SIGNS = ("failed to allocate memory", "out of memory", "bad_alloc", "bad allocation",
                       "alloc_failed", "cudaerrormemoryallocation")
OUT_OF_MEMORY_HINT = ("the device ran out of memory: lower the boxes a SAM call takes (option decoder_chunk) or "
                      "per prompt (max_boxes_per_prompt), use a smaller SAM (export --sam-variant vit_b), a smaller "
                      "image, or --device cpu")


def engine_failure(what: str, err: BaseException) -> EngineError:
    """An EngineError for an engine that failed to load or run: `what` failed, with the first
    line of the engine's message, and where that message says an allocation failed, what to lower."""
    text = str(err)
    first = text.splitlines()[0] if text.strip() else type(err).__name__
    message = f"{what}: {first}"
    if any(sign in text.lower() for sign in OUT_OF_MEMORY_SIGNS) and OUT_OF_MEMORY_HINT not in message:
        message += f" ({OUT_OF_MEMORY_HINT})"
    return EngineError(message)


def _show_one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: Any = None, line: str | None = None) -> None:
    try:
        print(f"warning: {message}", file=file or sys.stderr)
    except OSError:  # a closed stderr: warnings must not stop the run
        pass


def one_line_warnings(main: Main) -> Main:
    """A command-line entry point whose warnings print as one line, "warning: <message>": they
    speak to the user, and Python's default form adds the file and source line that warned."""
    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _show_one_line
            return main(*args, **kwargs)
    return run  # type: ignore[return-value]
