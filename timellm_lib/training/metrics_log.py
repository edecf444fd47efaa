"""metrics.jsonl: one JSON object per event, flushed per line, rewound on resume.

Every event has ``event`` (train, val, test, save, resume, early_stop), ``global_step``,
``epoch``, ``lr`` and a wall-clock ``time`` (seconds since 1970), plus its own fields.
``epoch`` and ``lr`` are those of the last optimizer step, so every event written at an epoch
end (val, the best and step saves, early_stop, test) names the epoch that ended and the lr it
trained with (the validation closing the first epoch says epoch 0 and the first epoch's lr,
not the next epoch's); a save event's ``step_in_epoch`` counts the steps of that epoch done
(``train_steps`` at its end, where the checkpoint file's own position is the next epoch's
step 0). A resume event gives the position it continues from (``global_step //
train_steps``, the epoch the next step belongs to) and the lr the next step will use.

A checkpoint records how many lines the log had when it was saved; resuming from it keeps
exactly those lines, so the continued log is the uninterrupted run's log plus a resume event.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from timellm_lib.files import write_text_atomic

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, path: str | Path, fresh: bool) -> None:
        """Open ``path`` for appending; ``fresh`` empties it first."""
        self.path = Path(path)
        if fresh:
            write_text_atomic(self.path, "")
        self.lines = len(_read_lines(self.path)) if self.path.exists() else 0
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the whole run)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, **{k: _jsonable(v) for k, v in fields.items()}}
        record["time"] = time.time()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.lines += 1
        return record

    def close(self) -> None:
        self._file.close()


def rewind_log(source: Path | None, target: Path, lines: int) -> int:
    """Make ``target`` hold the first ``lines`` lines of ``source``: the same file when a run
    resumes in place, another run's log when it continues from a checkpoint elsewhere, None
    for a checkpoint outside any run directory (the log then starts empty). Returns the number
    of lines kept (fewer than ``lines`` when ``source`` is shorter; a warning says so)."""
    kept = _read_lines(source)[:lines] if source is not None and source.exists() else []
    if len(kept) < lines:
        log.warning(
            "%s holds %d of the %d metrics lines the checkpoint recorded; keeping those",
            source or "no metrics.jsonl",
            len(kept),
            lines,
        )
    write_text_atomic(target, "".join(kept))
    return len(kept)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All events of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in _read_lines(Path(path))]


def _read_lines(path: Path) -> list[str]:
    """Complete lines only: a line cut off by a crash (no newline) is not an event."""
    return [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def _jsonable(value: Any) -> Any:
    """Tensors and numpy scalars become python numbers (inf and nan are written as JSON's
    Infinity and NaN, which python's json reads back)."""
    return value.item() if hasattr(value, "item") and callable(value.item) else value
