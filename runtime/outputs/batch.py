"""A run over many images: each through the pipeline into its files and its table row, a failure
reported while the run goes on, a progress bar, and the gallery page kept up to date."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import SaaError
from ..image_io import read_image
from ..result import JOINED_CAPTIONS_NOTE, RANDOM_WEIGHTS_NOTE
from .files import next_stem, write_outputs
from .gallery import GALLERY_NAME, write_gallery
from .summary import RunSummary

GALLERY_EVERY = 10  # a watch rewrites index.html after this many images (and at its end)


@dataclass
class Tally:
    """What a run did: images done (written or failed), the failures, NG verdicts, a batch's Ctrl-C."""

    processed: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)
    rejected: int = 0
    interrupted: bool = False
    inexact: int = 0  # images not run as the reference takes them (the first one is named on the console)


def process(paths: Iterable[Path], stems: dict[Path, str], pipeline: Any, out_dir: Path, summary: RunSummary,
            title: str, out_size: int | None = None, watching: bool = False, show_progress: bool = True) -> Tally:
    """Each image through the pipeline into its outputs and its table row; a failure is reported
    and the run goes on; Ctrl-C ends it with the table and page kept. stems: the names decided
    beforehand (a watch names files as they arrive: next_stem)."""
    tally = Tally()
    taken = set(stems.values())
    progress = _progress(paths, disable=not show_progress)
    try:
        for path in progress:
            stem = stems[path] if path in stems else next_stem(path, taken)
            try:
                image = read_image(path)
                result = pipeline(image, out_size=out_size)
                write_outputs(result, image, out_dir, stem, pipeline.thresholds.to_json())
                tally.rejected += result.pred_label or 0
                if not result.exact:
                    if not tally.inexact:  # once per run: every such image says so in its JSON and table row
                        progress.write(f"warning: {path}: {_not_exact_note(result)} (every such image: exact=no "
                                       "in summary.csv)", file=sys.stderr)
                    tally.inexact += 1
            except SaaError as err:
                tally.failures.append((path, str(err)))
                progress.write(f"failed: {err}", file=sys.stderr)
                summary.add_failure(path, stem, str(err))
            else:
                summary.add(path, stem, result)
            tally.processed += 1
            if watching and tally.processed % GALLERY_EVERY == 0:
                save_gallery(out_dir, summary, title)
    except KeyboardInterrupt:  # the watch's normal end; a batch's early one
        tally.interrupted = not watching
        progress.close()
        count = tally.processed
        print(f"{'watch ended' if watching else 'interrupted'} after {count} image{'' if count == 1 else 's'}",
              file=sys.stderr)
    return tally


def save_gallery(out_dir: Path, summary: RunSummary, title: str) -> bool:
    try:
        write_gallery(out_dir, summary.rows, title, summary.counts)
        return True
    except OSError as err:
        print(f"error: cannot write {out_dir / GALLERY_NAME}: {err.strerror}", file=sys.stderr)
        return False


def _progress(paths: Iterable[Path], disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(paths, unit="img", disable=disable, file=sys.stderr)


def announce(pipeline: Any, engine_dir: str | Path, joined_flag: bool = False) -> None:
    """What the run's maps are, said once at its start: random weights, lite engines, joined captions."""
    if pipeline.random_weights:
        print(f"warning: {engine_dir}: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
    if pipeline.saliency_only:
        print(f"{engine_dir}: lite engines: saliency-only anomaly maps (no GroundingDINO/SAM)", file=sys.stderr)
        if joined_flag:
            print("warning: --joined-captions changes nothing with lite engines (no GroundingDINO)", file=sys.stderr)
    elif pipeline.config.options.joined_captions:
        print(f"{JOINED_CAPTIONS_NOTE} (faster; compare it on your parts: bench.compare_engines)", file=sys.stderr)


def _not_exact_note(result: Any) -> str:
    return next((note for note in result.notes if note.startswith("not exact")), "not exact")
