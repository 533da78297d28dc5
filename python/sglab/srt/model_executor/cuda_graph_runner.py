"""CUDA graphs for decode: one graph per captured batch size (and sampling kind), replayed
with padding.

A decode step in a graph: the host uploads the step's inputs straight into the graph's static
buffers (`GraphInputs`: the new KV slots and the lengths every step; the request rows and the
sampling tensors only when the batch's requests changed), each participant prepares its
static state (`prepare_replay`; HiSparse: the step's backups, and the forward stream's wait for
them), and one replay runs everything else on the device: the prologue (positions, the input
tokens gathered from the future map, the `req_to_token` write, each participant's
`graph_prologue`: HiSparse's step state, then attention metadata), the model, the sampler and
the future-map store of the sampled tokens. The step's only other copy is the result's one
device->host copy (`managers/overlap_utils.py`).

Participants implement `init_cuda_graph_state(max_bs)`, `prepare_capture(bs)`,
`graph_prologue(forward_batch, bs)` (captured: device work from the static inputs only) and
`prepare_replay(forward_batch, bs)` (host side, before the replay). Padding rows point at
`ReqToTokenPool`'s padding row, KV slot 0 (the pool's sink) and length 1, so they never touch a
live request's state. Graphs see the same tensor objects at capture and replay.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable

import torch

from sglab.srt.debug.sync_audit import audit_region
from sglab.srt.layers.dp_attention import DpPaddingMode, DpStepInfo
from sglab.srt.layers.logits_processor import LogitsProcessorOutput
from sglab.srt.layers.sampler import SampleOutput, SamplingBatchInfo
from sglab.srt.mem_cache.memory_pool import PADDING_ROW
from sglab.srt.model_executor.decode_inputs import decode_inputs, decode_inputs_torch
from sglab.srt.model_executor.forward_batch_info import (
    ForwardBatch,
    ForwardMode,
    mamba_track_fields,
)
from sglab.srt.utils.h2d import h2d_into, is_pin_memory_available

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import ModelWorkerBatch, ScheduleBatch
    from sglab.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Static inputs: (name, dtype, value of a padding row). Uploaded every step: the first two.
_INPUTS = (("out_cache_loc", torch.int64, 0), ("seq_lens", torch.int64, 1),
           ("req_pool_indices", torch.int64, PADDING_ROW), ("sampling_top_ks", torch.int64, 1),
           ("sampling_seeds", torch.int64, 0), ("sampling_temperatures", torch.float32, 1.0),
           ("sampling_top_ps", torch.float32, 1.0), ("sampling_min_ps", torch.float32, 0.0))
_PER_STEP = ("out_cache_loc", "seq_lens")
_PADS = {name: pad for name, _, pad in _INPUTS}
_DTYPES = {name: dtype for name, dtype, _ in _INPUTS}
# Sampling kinds a graph can end with: greedy, or the general path with its two filter flags.
GREEDY = ("greedy",)


def get_capture_bs(max_bs: int, capture_bs: list[int] | None = None) -> list[int]:
    if capture_bs:
        return sorted(set(capture_bs))
    sizes = [1, 2, 4, 8, 12] + list(range(16, 257, 8)) + list(range(272, 512, 16)) + \
        list(range(512, max_bs + 1, 32))
    sizes = [b for b in sizes if b <= max_bs]
    return sorted(set(sizes + [max_bs]))


class GraphInputs:
    """The graphs' static inputs, all in one device buffer, and their upload (patch 0001's
    form: each input from pageable or pinned memory, or, packed, one copy of a pinned host
    mirror of the buffer; a mirror is rewritten only after its last copy's event)."""

    def __init__(self, max_bs: int, device: torch.device, h2d_mode: str):
        self.max_bs, self.device, self.h2d_mode = max_bs, device, h2d_mode
        self.offsets, total = {}, 0
        for name, dtype, _ in _INPUTS:
            self.offsets[name] = total
            total += max_bs * dtype.itemsize
        self.buf = torch.zeros(total, dtype=torch.uint8, device=device)
        self.views = {name: self._view(self.buf, name, dtype) for name, dtype, _ in _INPUTS}
        self.mirrors = [_Mirror(total, is_pin_memory_available(device)) for _ in range(2)]
        self.next_mirror = 0
        self.composition, self.bs = -1, -1

    def _view(self, buf: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        off = self.offsets[name]
        return buf[off:off + self.max_bs * dtype.itemsize].view(dtype)

    def fill_padding(self) -> None:
        for name, _, pad in _INPUTS:
            self.views[name].fill_(pad)
        self.composition = -1

    def upload(self, batch: "ModelWorkerBatch", bs: int) -> None:
        """This step's inputs, padded to `bs` rows, straight into the static buffers."""
        items = {"out_cache_loc": batch.out_cache_loc, "seq_lens": batch.seq_lens_cpu}
        if (batch.composition, bs) != (self.composition, self.bs):
            items["req_pool_indices"] = batch.req_pool_indices
            for name, (t, _) in batch.sampling_info.host_tensors().items():
                items[name] = t.view(-1)
            self.composition, self.bs = batch.composition, bs
        padded = {name: _pad(t, bs, _PADS[name], _DTYPES[name]) for name, t in items.items()}
        if self.h2d_mode == "packed":
            self._upload_packed(padded)
        else:
            for name, t in padded.items():
                h2d_into(self.views[name][:bs], t, self.h2d_mode == "pinned")

    def _upload_packed(self, padded: dict[str, torch.Tensor]) -> None:
        mirror = self.mirrors[self.next_mirror]
        self.next_mirror = (self.next_mirror + 1) % len(self.mirrors)
        mirror.wait()
        lo, hi = self.buf.numel(), 0
        for name, t in padded.items():
            view = self._view(mirror.buf, name, t.dtype)[:t.numel()]
            view.copy_(t)
            off = self.offsets[name]
            lo, hi = min(lo, off), max(hi, off + t.numel() * t.element_size())
        self.buf[lo:hi].copy_(mirror.buf[lo:hi], non_blocking=True)
        mirror.record()


class _Mirror:
    def __init__(self, nbytes: int, pin: bool):
        self.buf = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.event = torch.cuda.Event() if pin else None
        self.recorded = False

    def wait(self) -> None:
        if self.event is not None and self.recorded:
            self.event.synchronize()  # its copy, a step or more ago, has run

    def record(self) -> None:
        if self.event is not None:
            self.event.record()
            self.recorded = True


def _pad(t: torch.Tensor, bs: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    t = t.reshape(-1).to(dtype)
    if t.numel() == bs:
        return t
    return torch.cat([t, torch.full((bs - t.numel(),), value, dtype=dtype)])


class CudaGraphRunner:
    name = "decode"

    def __init__(self, model_runner: "ModelRunner", graph_factory: Callable[[], Any] | None = None):
        """`graph_factory` builds a graph object (`torch.cuda.CUDAGraph` by default)."""
        self.model_runner = model_runner
        args = model_runner.server_args
        self.capture_bs = get_capture_bs(min(args.cuda_graph_max_bs,
                                             model_runner.max_running_requests),
                                         args.cuda_graph_bs)
        self.max_bs = self.capture_bs[-1]
        self.graph_factory = graph_factory or torch.cuda.CUDAGraph
        self.inputs = GraphInputs(self.max_bs, model_runner.device, model_runner.h2d_mode)
        self.fused_inputs = args.kernel_fusion == "on"  # the in-graph prologue in one launch
        # HiSparse first: its prologue computes the lengths the attention metadata is built on.
        self.participants = [p for p in (model_runner.hisparse_coordinator,) if p is not None]
        self.participants.append(model_runner.attn_backend)
        if model_runner.lora_manager is not None:
            self.participants.append(model_runner.lora_manager)
        for p in self.participants:
            p.init_cuda_graph_state(self.max_bs)
        self.graphs: dict[tuple, Any] = {}
        self.outputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.num_replays = 0
        for bs in reversed(self.capture_bs):
            self._capture(bs, GREEDY)
        logger.info("Captured CUDA graphs for decode batch sizes %s", self.capture_bs)

    # --- capture ------------------------------------------------------------------------------

    def _static_batch(self, bs: int, kind: tuple) -> ForwardBatch:
        mr, v = self.model_runner, self.inputs.views
        fb = ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=None,  # type: ignore
            req_pool_indices=v["req_pool_indices"][:bs], seq_lens=v["seq_lens"][:bs],
            out_cache_loc=v["out_cache_loc"][:bs], positions=None,  # type: ignore[arg-type]
            seq_lens_sum=bs, seq_lens_cpu=torch.ones(bs, dtype=torch.int64),
            req_to_token_pool=mr.req_to_token_pool, token_to_kv_pool=mr.token_to_kv_pool,
            attn_backend=mr.attn_backend, lora_ids=[None] * bs,
            hisparse_coordinator=mr.hisparse_coordinator)
        fb.sampling_info = _static_sampling_info(v, bs, kind)
        fb.dp_step = self._dp_step(bs)
        return fb

    def _dp_step(self, bs: int) -> DpStepInfo | None:
        """DP attention: every rank replays the graph of the same size, padded (MAX_LEN)."""
        info = self.model_runner.dp_info
        if not info.enabled:
            return None
        return DpStepInfo([bs] * info.dp_size, DpPaddingMode.MAX_LEN)

    @torch.inference_mode()
    def _capture(self, bs: int, kind: tuple) -> None:
        fb = self._static_batch(bs, kind)
        future = self.model_runner.future_map.token_ids
        if not self.graphs:
            self.inputs.fill_padding()
            saved = None
        else:  # captured while serving: the warm-up steps must not advance the live rows
            saved = future.clone()
        self._prepare_capture(bs)

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            return self._step(fb, bs, kind)

        for _ in range(2):
            run()
        self._synchronize()
        graph = self.graph_factory()
        with self._capture_context(graph):
            out = run()
        if saved is not None:
            future.copy_(saved)
        self.pool = graph.pool() if isinstance(graph, torch.cuda.CUDAGraph) else None
        self.graphs[(bs, kind)], self.outputs[(bs, kind)] = graph, out
        if isinstance(graph, EagerGraph):
            graph.capture_fn, graph.outputs = run, out

    def _prepare_capture(self, bs: int) -> None:
        for p in self.participants:
            p.prepare_capture(bs)

    def _capture_context(self, graph: Any):
        if isinstance(graph, torch.cuda.CUDAGraph):
            return torch.cuda.graph(graph, pool=self.pool)
        return graph.capture()

    def _synchronize(self) -> None:
        if self.model_runner.device.type == "cuda":
            torch.cuda.synchronize()

    def _step(self, fb: ForwardBatch, bs: int, kind: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step from the static inputs: what a graph replays."""
        mr = self.model_runner
        rows, lens, out = fb.req_pool_indices, fb.seq_lens, fb.out_cache_loc
        inputs = decode_inputs if self.fused_inputs else decode_inputs_torch
        fb.positions, fb.input_ids = inputs(lens, rows, out, mr.future_map,
                                            mr.req_to_token_pool.req_to_token)
        for p in self.participants:
            p.graph_prologue(fb, bs)
        logits = mr.model.forward(fb.input_ids, fb.positions, fb).next_token_logits
        next_ids = mr.sampler(logits, fb.sampling_info, lens).next_token_ids
        mr.future_map.store(rows, next_ids)
        return logits, next_ids

    # --- replay -------------------------------------------------------------------------------

    def fits_locally(self, batch: "ScheduleBatch") -> bool:
        """This rank's vote in DP attention's agreement (an IDLE rank pads to any size)."""
        mode = batch.forward_mode
        return mode.is_idle() or (mode.is_decode() and batch.batch_size() <= self.max_bs)

    def can_run(self, batch: "ModelWorkerBatch") -> bool:
        if batch.global_num_tokens is not None:  # DP attention: every rank replays, or none
            return batch.can_run_dp_cuda_graph and not batch.is_extend_in_batch and \
                max(batch.global_num_tokens) <= self.max_bs
        return batch.forward_mode.is_decode() and len(batch.seq_lens_cpu) <= self.max_bs

    def _graph_bs(self, batch: "ModelWorkerBatch") -> int:
        """The captured size to replay: the batch's, or under DP attention the largest
        rank's."""
        raw_bs = len(batch.seq_lens_cpu)
        if batch.global_num_tokens is not None:
            raw_bs = max(batch.global_num_tokens)
        return self.capture_bs[bisect.bisect_left(self.capture_bs, raw_bs)]

    @torch.inference_mode()
    def replay(self, batch: "ModelWorkerBatch",
               ) -> tuple[LogitsProcessorOutput, SampleOutput | None]:
        """A decode step through a graph: upload and replay; the sample too when the graph ends
        with the batch's sampler (else None: the worker calls `sample_after_replay`, for
        logprobs, penalties, grammars)."""
        raw_bs = len(batch.seq_lens_cpu)
        bs = self._graph_bs(batch)
        with audit_region("ForwardBatch.init_new"):
            self.inputs.upload(batch, bs)
        fb = self._replay_batch(batch, bs)
        for p in self.participants:
            p.prepare_replay(fb, fb.batch_size)
        kind = graph_sampling_kind(batch)
        key = (bs, kind or GREEDY)
        if key not in self.graphs and self.model_runner.dp_info.enabled:
            # A capture runs the MLP's collectives: under DP attention the ranks capture
            # together at start-up only, and other sampling kinds sample after the replay.
            kind, key = None, (bs, GREEDY)
        if key not in self.graphs:
            logger.info("Capturing a %s graph for size %d, sampling %s", self.name, bs, key[1])
            self._capture(bs, key[1])
        self._apply_row_writes(batch)
        self.graphs[key].replay()
        self.num_replays += 1
        logits, next_ids = self.outputs[key]
        logits_output = LogitsProcessorOutput(next_token_logits=logits[:raw_bs])
        if kind is not None:
            return logits_output, SampleOutput(next_token_ids=next_ids[:raw_bs])
        return logits_output, None

    @torch.inference_mode()
    def sample_after_replay(self, batch: "ModelWorkerBatch",
                            logits_output: LogitsProcessorOutput) -> SampleOutput:
        """Sample the replay's logits eagerly (the graph's static sampling inputs still hold
        this batch's: the next replay comes after), then store the tokens in the future map."""
        eager = self._eager_sampling_batch(batch, len(batch.seq_lens_cpu))
        sample_output = self.model_runner.sample(logits_output, eager)
        self.model_runner.future_map.store(eager.req_pool_indices, sample_output.next_token_ids)
        return sample_output

    def _apply_row_writes(self, batch: "ModelWorkerBatch") -> None:
        """Decode steps queue no row writes (their slots go in inside the graph)."""

    def _replay_batch(self, batch: "ModelWorkerBatch", bs: int) -> ForwardBatch:
        """The host-side view a participant prepares its replay from (padded to `bs`)."""
        pad = bs - len(batch.seq_lens_cpu)
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=None,  # type: ignore
            dp_step=self._dp_step(bs),
            req_pool_indices=self.inputs.views["req_pool_indices"][:bs],
            seq_lens=self.inputs.views["seq_lens"][:bs],
            out_cache_loc=self.inputs.views["out_cache_loc"][:bs],
            positions=None,  # type: ignore[arg-type]
            seq_lens_sum=batch.seq_lens_sum + pad, seq_lens_cpu=batch.seq_lens_cpu,
            seq_lens_max=batch.seq_lens_max,
            lora_ids=self._lora_ids(batch, pad),
            lora_inflight_ids=batch.lora_inflight_ids,
            hisparse_coordinator=self.model_runner.hisparse_coordinator,
            hisparse_plan=batch.hisparse_plan, **mamba_track_fields(batch))

    def _lora_ids(self, batch: "ModelWorkerBatch", pad: int) -> list[str | None] | None:
        if self.model_runner.lora_manager is None:
            return None
        return list(batch.lora_ids or [None] * len(batch.seq_lens_cpu)) + [None] * pad

    def _eager_sampling_batch(self, batch: "ModelWorkerBatch", raw_bs: int) -> ForwardBatch:
        fb = self._replay_batch(batch, raw_bs)
        fb.return_logprob, fb.top_logprobs_nums = batch.return_logprob, batch.top_logprobs_nums
        fb.token_ids_logprobs = batch.token_ids_logprobs
        fb.sampling_info = sampling_after_replay(self.inputs.views, batch, raw_bs)
        return fb


def sampling_after_replay(views: dict, batch: "ModelWorkerBatch",
                          raw_bs: int) -> SamplingBatchInfo:
    """The batch's sampler over the graph's static sampling inputs (logprobs, penalties)."""
    info = _static_sampling_info(views, raw_bs, _kind_of(batch.sampling_info))
    info.penalizer_orchestrator = batch.sampling_info.penalizer_orchestrator
    info.grammars = batch.sampling_info.grammars
    info.custom_logit_processors = batch.sampling_info.custom_logit_processors
    return info


def graph_sampling_kind(batch: "ModelWorkerBatch") -> tuple | None:
    """The sampler a graph can end with for this batch, or None: sample after the replay."""
    info = batch.sampling_info
    if batch.return_logprob or info.penalizer_orchestrator is not None or \
            info.grammars is not None or info.custom_logit_processors is not None:
        return None
    return _kind_of(info)


def _kind_of(info: SamplingBatchInfo) -> tuple:
    if info.is_all_greedy:
        return GREEDY
    return ("sample", info.need_top_p_top_k, info.need_min_p_sampling)


def _static_sampling_info(views: dict, bs: int, kind: tuple) -> SamplingBatchInfo:
    greedy = kind == GREEDY
    return SamplingBatchInfo(
        temperatures=views["sampling_temperatures"][:bs].view(-1, 1),
        top_ps=views["sampling_top_ps"][:bs], top_ks=views["sampling_top_ks"][:bs],
        min_ps=views["sampling_min_ps"][:bs], seeds=views["sampling_seeds"][:bs],
        is_all_greedy=greedy, need_min_p_sampling=not greedy and kind[2],
        need_top_p_top_k=not greedy and kind[1])


class EagerGraph:
    """A stand-in for `torch.cuda.CUDAGraph` off CUDA: replay runs the captured step again on
    the same static tensors. It lets CPU tests drive the graph runner's static buffers,
    padding, prologue and participants; what only a real capture shows (no host syncs, no
    allocations outside the pool) is left to the GPU tests."""

    capture_fn: Callable[[], Any] | None = None
    outputs: tuple = ()

    def capture(self):
        return contextlib.nullcontext()

    def replay(self) -> None:
        for static, new in zip(self.outputs, self.capture_fn()):
            static.copy_(new)

