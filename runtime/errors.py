"""Errors the runtime raises for the user's input; each message names the file or setting at fault."""
from __future__ import annotations


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
