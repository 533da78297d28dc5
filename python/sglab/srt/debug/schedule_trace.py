"""Schedule trace: one JSON line per launched batch, to tell which schedule a request saw.

    SGLAB_SCHEDULE_TRACE=/tmp/trace.jsonl python -m sglab.launch_server ...

Each line: the step, forward mode, request ids, and their prefix / extend / sequence lengths
(host values only). The path gets `.<pid>` appended, so every scheduler writes its own file.
Debug instrumentation: off unless the variable is set, and then a host-side write per step.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import ScheduleBatch


class ScheduleTrace:
    def __init__(self, path: str | None = None):
        path = path or os.environ.get("SGLAB_SCHEDULE_TRACE")
        self.file: TextIO | None = open(f"{path}.{os.getpid()}", "a") if path else None

    def record(self, step: int, batch: "ScheduleBatch") -> None:
        if self.file is None:
            return
        line = {"step": step, "mode": batch.forward_mode.name,
                "rids": [r.rid for r in batch.reqs],
                "seq_lens": batch.seq_lens_cpu.tolist()}
        if batch.forward_mode.is_extend():
            line["prefix_lens"], line["extend_lens"] = batch.prefix_lens, batch.extend_lens
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
