"""The schedule trace records every launched batch's composition, only when asked."""

from __future__ import annotations

import json

from sglab.srt.debug.schedule_trace import ScheduleTrace
from sglab.test.runners import SchedulerRunner


def test_trace_lines_follow_the_batches(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SGLAB_SCHEDULE_TRACE", str(tmp_path / "t.jsonl"))
    runner = SchedulerRunner(model_path=tiny_model_dir("tiny-qwen3"))
    rids = [runner.submit(list(range(10, 10 + n)), {"max_new_tokens": 3, "temperature": 0,
                                                    "ignore_eos": True}) for n in (5, 9)]
    runner.run()
    (path,) = tmp_path.iterdir()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["mode"] == "EXTEND" and lines[0]["rids"] == rids
    assert lines[0]["extend_lens"] == [5, 9] and lines[0]["seq_lens"] == [5, 9]
    decodes = [x for x in lines if x["mode"] == "DECODE"]
    assert decodes and decodes[0]["seq_lens"] == [6, 10]
    assert [x["step"] for x in lines] == list(range(1, len(lines) + 1))


def test_trace_is_off_by_default(monkeypatch):
    monkeypatch.delenv("SGLAB_SCHEDULE_TRACE", raising=False)
    assert ScheduleTrace().file is None
