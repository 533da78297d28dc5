"""The data-parallel controller (upstream's `managers/data_parallel_controller.py`): under DP
attention it stands between the tokenizer manager and the attention groups' schedulers.

Generate requests are dealt round robin (upstream's default load-balance method), one group
each; every other message (aborts, cache flushes, state and profiler requests) goes to every
group, and each group's rank 0 answers the tokenizer manager itself.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import zmq

from sglab.srt.managers.io_struct import TokenizedGenerateReqInput
from sglab.srt.server_args import PortArgs, ServerArgs, configure_logging

logger = logging.getLogger(__name__)


class DataParallelController:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs):
        self.context = zmq.Context(1 + len(port_args.dp_scheduler_ipc_names))
        self.recv_from_tokenizer = self.context.socket(zmq.PULL)
        self.recv_from_tokenizer.setsockopt(zmq.RCVHWM, 0)
        self.recv_from_tokenizer.connect(port_args.scheduler_input_ipc_name)
        self.workers = []
        for name in port_args.dp_scheduler_ipc_names:
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.bind(name)
            self.workers.append(sock)
        self.round_robin_counter = 0

    def round_robin_scheduler(self, req: TokenizedGenerateReqInput) -> None:
        self.workers[self.round_robin_counter].send_pyobj(req)
        self.round_robin_counter = (self.round_robin_counter + 1) % len(self.workers)

    def dispatch(self, obj: Any) -> None:
        for item in obj if isinstance(obj, list) else [obj]:
            if isinstance(item, TokenizedGenerateReqInput):
                self.round_robin_scheduler(item)
            else:
                for worker in self.workers:
                    worker.send_pyobj(item)

    def event_loop(self) -> None:
        while True:
            self.dispatch(self.recv_from_tokenizer.recv_pyobj())


def run_data_parallel_controller_process(server_args: ServerArgs, port_args: PortArgs) -> None:
    configure_logging(server_args.log_level, " DP controller")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    DataParallelController(server_args, port_args).event_loop()
