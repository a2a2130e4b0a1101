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
