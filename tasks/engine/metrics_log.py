"""The run's ``metrics.jsonl``: one JSON record per line, appended as training goes, cut back to the
checkpoint on resume (a torn last line, from a crash or a full disk mid-append, is dropped with a warning)."""

import json
import warnings
from pathlib import Path
from typing import Any

from seqpe_nd.tasks.engine.checkpoint import CorruptFile, atomic_write_text


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop lines logged after the checkpoint: those steps are about to run again.

    A torn last line (a crash or a full disk mid-append) is dropped with a warning; a bad line
    anywhere else means the file is not ours to rewrite, and raises naming it.
    """
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropping its torn last line {line[:60]!r}", stacklevel=2)
                break
            raise CorruptFile(f"{path} line {i + 1} is not JSON ({line[:60]!r}); fix or remove that line") from None
        if record["step"] <= last_step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
