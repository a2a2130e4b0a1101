"""What counts as a number in the files users write (prompt configs, manifests): JSON/YAML values."""
from __future__ import annotations

import math
from typing import Any


def is_integer(value: Any) -> bool:
    """An int, not a bool (YAML's true and JSON's true are ints to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An int or float, not a bool, not NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
