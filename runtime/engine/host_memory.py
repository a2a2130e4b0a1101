"""How much host memory a step may take, so that a step too big for the machine is refused with
a message instead of ending in the kernel's out-of-memory kill (which leaves no message at all)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ImageError

_CGROUP = Path("/sys/fs/cgroup")


def available_bytes() -> int | None:
    """Memory this process can still get: Linux's MemAvailable, capped by a cgroup v2 limit
    (containers see the host's MemAvailable). None where neither can be read (other systems)."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            found.append(max(0, int(limit) - int((_CGROUP / "memory.current").read_text())))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


FIXED_BYTES = 512 * 2**20  # what a call takes beyond its masks whatever the size (bench.experiments.host_memory: 380-470 MB)


def mask_bytes(count: int, image_hw: tuple[int, int]) -> int:
    """Host bytes a full-pipeline call takes for `count` regions: one bool mask per region at
    image size, about 32 bytes a pixel for the float maps and one mask's upscaling buffers, and a
    fixed FIXED_BYTES. Measured with `python -m bench.experiments.host_memory` (tiny engines; the masks do not
    depend on the model size): the call's peak over its starting RSS was 0.80-0.83 of this from
    1000x1000 (75 regions) to 8000x8000 (59 regions, 4.9 GiB): bench/results/host_memory_cpu_tiny_2026-11-26.json."""
    pixels = int(image_hw[0]) * int(image_hw[1])
    return count * pixels + 32 * pixels + FIXED_BYTES


def check_mask_memory(count: int, image_hw: tuple[int, int]) -> None:
    """ImageError when `count` image-size masks would not fit in the host memory left: the
    process would otherwise be killed by the kernel without a word (a batch loses every image)."""
    need, available = mask_bytes(count, image_hw), available_bytes()
    if available is not None and need > available:
        raise ImageError(
            f"{count} regions at {image_hw[0]}x{image_hw[1]} need about {need / 2**30:.1f} GiB of masks, "
            f"more than the {available / 2**30:.1f} GiB of memory left: downscale the image or lower "
            "max_boxes_per_prompt in the config's options"
        )
