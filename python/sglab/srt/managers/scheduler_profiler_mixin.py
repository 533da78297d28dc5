"""The scheduler's torch profiler: /start_profile and /stop_profile, and stopping after a
number of steps."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from sglab.srt.managers.io_struct import ProfileReq, ProfileReqOutput

if TYPE_CHECKING:
    from sglab.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)


class SchedulerProfilerMixin:
    def init_profiler(self: Scheduler) -> None:
        self.profiler: torch.profiler.profile | None = None
        self.profile_steps_left: int | None = None  # None: until /stop_profile
        self.profile_dir = ""
        self.profile_prefix = ""

    def profile(self: Scheduler, req: ProfileReq) -> ProfileReqOutput:
        if req.type == "start":
            return self.start_profile(req)
        return self.stop_profile()

    def start_profile(self: Scheduler, req: ProfileReq) -> ProfileReqOutput:
        if self.profiler is not None:
            return ProfileReqOutput(False, "Profiling is already in progress.")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile_dir = req.output_dir or os.environ.get("SGLANG_TORCH_PROFILER_DIR", "/tmp")
        self.profile_prefix = req.profile_prefix or "sglab"
        self.profiler = torch.profiler.profile(activities=activities,
                                               with_stack=bool(req.with_stack),
                                               record_shapes=bool(req.record_shapes))
        self.profiler.start()
        self.profile_steps_left = req.num_steps
        return ProfileReqOutput(True, "Start profiling.")

    def stop_profile(self: Scheduler) -> ProfileReqOutput:
        if self.profiler is None:
            return ProfileReqOutput(False, "Profiling is not in progress.")
        self.profiler.stop()
        os.makedirs(self.profile_dir, exist_ok=True)
        name = f"{self.profile_prefix}-{int(time.time())}.trace.json"
        path = os.path.join(self.profile_dir, name)
        self.profiler.export_chrome_trace(path)
        self.profiler, self.profile_steps_left = None, None
        logger.info("Profile trace written to %s", path)
        return ProfileReqOutput(True, path)

    def _profile_step(self: Scheduler) -> None:
        """After each launched step: stop once the requested number of steps ran."""
        if self.profile_steps_left is None:
            return
        self.profile_steps_left -= 1
        if self.profile_steps_left <= 0:
            self.stop_profile()
