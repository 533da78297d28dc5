"""CUDA graphs for decode: one graph per captured batch size, replayed with padding.

Graphs see the same tensor objects at capture and replay: each step's inputs are copied into
static buffers, and the attention backend refills its static metadata before every replay.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

import torch

from sglab.srt.layers.logits_processor import LogitsProcessorOutput
from sglab.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from sglab.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def get_capture_bs(max_bs: int, capture_bs: list[int] | None = None) -> list[int]:
    if capture_bs:
        return sorted(set(capture_bs))
    sizes = [1, 2, 4, 8, 12] + list(range(16, 257, 8)) + list(range(272, 512, 16)) + \
        list(range(512, max_bs + 1, 32))
    sizes = [b for b in sizes if b <= max_bs]
    return sorted(set(sizes + [max_bs]))


class CudaGraphRunner:
    def __init__(self, model_runner: "ModelRunner"):
        self.model_runner = model_runner
        args = model_runner.server_args
        self.capture_bs = get_capture_bs(min(args.cuda_graph_max_bs,
                                             model_runner.max_running_requests),
                                         args.cuda_graph_bs)
        self.max_bs = self.capture_bs[-1]
        device = model_runner.device
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.req_pool_indices = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        model_runner.attn_backend.init_cuda_graph_state(
            self.max_bs, model_runner.req_to_token_pool.max_context_len)
        if model_runner.lora_manager is not None:
            model_runner.lora_manager.init_cuda_graph_batch_info(self.max_bs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.capture()

    def _static_batch(self, bs: int) -> ForwardBatch:
        mr = self.model_runner
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=self.input_ids[:bs],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs], positions=self.positions[:bs],
            seq_lens_sum=bs, seq_lens_cpu=torch.ones(bs, dtype=torch.int64),
            req_to_token_pool=mr.req_to_token_pool, token_to_kv_pool=mr.token_to_kv_pool,
            attn_backend=mr.attn_backend)

    @torch.inference_mode()
    def capture(self) -> None:
        backend = self.model_runner.attn_backend
        for bs in reversed(self.capture_bs):
            fb = self._static_batch(bs)
            backend.init_forward_metadata_capture_cuda_graph(bs)
            backend.init_forward_metadata_replay_cuda_graph(bs, self.req_pool_indices,
                                                            self.seq_lens, 1)
            if self.model_runner.lora_manager is not None:
                # Capture on the static LoRA batch info; before each replay,
                # ForwardBatch.init_new refills it for the real batch.
                fb.lora_ids = [None] * bs
                self.model_runner.lora_manager.prepare_lora_batch(fb)

            def run() -> torch.Tensor:
                return self.model_runner.model.forward(fb.input_ids, fb.positions,
                                                       fb).next_token_logits

            for _ in range(2):
                run()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = run()
            self.pool = graph.pool()
            self.graphs[bs], self.outputs[bs] = graph, out
        logger.info("Captured CUDA graphs for decode batch sizes %s", self.capture_bs)

    def can_run(self, forward_batch: ForwardBatch) -> bool:
        return forward_batch.forward_mode.is_decode() and \
            forward_batch.batch_size <= self.max_bs

    def replay(self, forward_batch: ForwardBatch) -> LogitsProcessorOutput:
        fb = forward_batch
        raw_bs = fb.batch_size
        bs = self.capture_bs[bisect.bisect_left(self.capture_bs, raw_bs)]
        if bs != raw_bs:
            self.seq_lens[raw_bs:bs].fill_(1)
            self.req_pool_indices[raw_bs:bs].zero_()
            self.out_cache_loc[raw_bs:bs].zero_()
            self.positions[raw_bs:bs].zero_()
        self.input_ids[:raw_bs].copy_(fb.input_ids)
        self.req_pool_indices[:raw_bs].copy_(fb.req_pool_indices)
        self.seq_lens[:raw_bs].copy_(fb.seq_lens)
        self.out_cache_loc[:raw_bs].copy_(fb.out_cache_loc)
        self.positions[:raw_bs].copy_(fb.positions)
        self.model_runner.attn_backend.init_forward_metadata_replay_cuda_graph(
            bs, self.req_pool_indices, self.seq_lens, fb.seq_lens_max)
        self.graphs[bs].replay()
        return LogitsProcessorOutput(next_token_logits=self.outputs[bs][:raw_bs])
