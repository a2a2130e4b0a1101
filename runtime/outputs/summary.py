"""The run's summary table: one row per input image, written as the run goes (`<out>/summary.csv`).

A folder of parts is easier to review as one table, sorted by score in a spreadsheet, than as
hundreds of JSON files: each row names the image and its output stem, says whether it was
processed, and gives the image score, the OK/NG label where a threshold is set, whether the image
ran exactly as the reference algorithm takes it (`exact`: yes/no, the JSON's note says why), the fused defect
regions with the best one's prompt, phrase and score, and the time it took. Rows are flushed one by one,
so an interrupted run keeps the rows it wrote. A write that fails (a full disk) stops the table,
not the run: `error` then says why, for the caller to report.
"""
from __future__ import annotations

import csv
from pathlib import Path
from types import TracebackType
from typing import IO, Mapping, Sequence

from ..errors import SaaError
from ..inputs import SUMMARY_COLUMNS as COLUMNS
from ..inputs import SUMMARY_NAME
from ..pipeline import AnomalyResult

KEEP_ROWS = 1000  # rows of each kind a long watch keeps in memory for the gallery (the table has them all)


class RunSummary:
    """Writes `summary.csv` in `out_dir`, replacing an earlier run's (it describes this run only)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / SUMMARY_NAME
        try:
            # Names that are not UTF-8 (bytes Python holds as surrogates) come out with "?" marks.
            self._file: IO[str] = open(self.path, "w", newline="", encoding="utf-8", errors="replace")
        except OSError as err:
            raise SaaError(f"cannot write {self.path}: {err.strerror}") from None
        self._writer = csv.writer(self._file)
        self.error: str | None = None  # why the table stopped, if it did
        # The gallery's input, by column: every row of a batch; a watch that runs for days keeps
        # the KEEP_ROWS highest-scoring parts and the KEEP_ROWS latest failures.
        self.rows: list[dict[str, str]] = []
        self.counts = {"ok": 0, "failed": 0}
        self._write(COLUMNS)

    def add(self, image: Path, stem: str, result: AnomalyResult) -> None:
        """A processed image's row."""
        fused = sorted((r for r in result.regions if r.in_top_k), key=lambda r: -r.score)
        label = {1: "NG", 0: "OK"}.get(result.pred_label, "")  # "": no image threshold set
        top = fused[0] if fused else None
        self._row((str(image), stem, "ok", _number(result.pred_score), label, "yes" if result.exact else "no", len(fused),
                   top.prompt if top else "", top.phrase if top else "", _number(top.score) if top else "",
                   _number(result.timings_ms.get("end_to_end"), ".1f"), ""))

    def add_failure(self, image: Path, stem: str, error: str) -> None:
        """An image that could not be read, processed or written."""
        self._row((str(image), stem, "failed", "", "", "", "", "", "", "", "", error))

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as err:  # the last buffered bytes did not reach the disk
            self.error = self.error or f"cannot write {self.path}: {err.strerror}"

    def __enter__(self) -> "RunSummary":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def _row(self, values: tuple) -> None:
        row = {column: str(value) for column, value in zip(COLUMNS, values)}
        self.rows.append(row)
        self.counts[row["status"]] += 1
        if len(self.rows) > 2 * KEEP_ROWS:
            done, failed = ranked(self.rows)
            self.rows = done[:KEEP_ROWS] + failed[-KEEP_ROWS:]
        self._write(values)

    def _write(self, values: tuple) -> None:
        if self.error is not None:
            return
        try:
            self._writer.writerow(values)
            self._file.flush()
        except OSError as err:
            self.error = f"cannot write {self.path}: {err.strerror}; its rows stop there"


def ranked(rows: Sequence[Mapping[str, str]]) -> tuple[list[Mapping[str, str]], list[Mapping[str, str]]]:
    """(processed rows, highest image score first; failed rows, in the order they came)."""
    done = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -row_score(r))
    return done, [r for r in rows if r["status"] != "ok"]


def row_score(row: Mapping[str, str]) -> float:
    """A row's image score as a number (-inf for a row without one: a failure)."""
    try:
        return float(row["image_score"])
    except ValueError:
        return float("-inf")


def _number(value: float | None, spec: str = ".6g") -> str:
    return "" if value is None else format(float(value), spec)
