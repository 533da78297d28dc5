"""Test runners: sglab's scheduler driven in-process, and HF transformers as the reference."""

from __future__ import annotations

import contextlib
import gc
import importlib
import itertools
import sys
from dataclasses import dataclass, field

import torch

from sglab.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from sglab.srt.managers.scheduler import Scheduler
from sglab.srt.managers.scheduler_output_processor_mixin import LOGPROB_FIELDS
from sglab.srt.sampling.sampling_params import SamplingParams
from sglab.srt.server_args import ServerArgs


@dataclass
class RunOutput:
    rid: str
    output_ids: list[int] = field(default_factory=list)
    finish_reason: dict | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_retractions: int = 0
    logprobs: dict[str, list] = field(default_factory=dict)


def free_gpu_memory() -> None:
    """Collect a dropped runner's pools (held in reference cycles) and return their memory, so
    the next runner sizes its KV cache from the whole GPU."""
    gc.collect()
    torch.cuda.empty_cache()


class SchedulerRunner:
    """A Scheduler without sockets: submit tokenized requests, step until idle, read outputs."""

    _rids = itertools.count()

    def __init__(self, **server_args):
        server_args.setdefault("random_seed", 0)
        server_args.setdefault("enable_integrity_check", True)
        self.server_args = ServerArgs(**server_args)
        self.scheduler = Scheduler(self.server_args)
        self.tokenizer = self.scheduler.tokenizer

    def submit(self, input_ids: list[int], sampling_params: dict | None = None,
               return_logprob: bool = False, logprob_start_len: int = -1,
               top_logprobs_num: int = 0, rid: str | None = None,
               lora_path: str | None = None, stream: bool = False,
               token_ids_logprob: list[int] | None = None,
               custom_logit_processor: str | None = None) -> str:
        params = SamplingParams.from_dict(sampling_params)
        params.normalize(self.tokenizer)
        rid = rid or f"r{next(self._rids)}"
        self.scheduler.handle_generate_request(TokenizedGenerateReqInput(
            rid=rid, input_text=None, input_ids=list(input_ids), sampling_params=params,
            return_logprob=return_logprob, logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num, lora_path=lora_path, stream=stream,
            token_ids_logprob=token_ids_logprob, custom_logit_processor=custom_logit_processor))
        return rid

    def abort(self, rid: str) -> None:
        self.scheduler.abort_request(AbortReq(rid=rid))

    def run(self, max_steps: int = 100000) -> dict[str, RunOutput]:
        """Step until idle; returns every request's output, merged from the streamed deltas."""
        for _ in range(max_steps):
            if not self.scheduler.run_step() and not self._staging() and \
                    not self._compiling():
                break
        else:
            raise RuntimeError("scheduler did not become idle")
        return self.collect()

    def _staging(self) -> bool:
        """HiSparse: requests whose KV is still on its way to the host (nothing to run yet)."""
        hisparse = self.scheduler.hisparse
        return hisparse is not None and hisparse.has_ongoing_staging()

    def _compiling(self) -> bool:
        """Requests waiting for their grammar to compile (nothing to run yet)."""
        pending = [r.grammar_future for r in self.scheduler.waiting_queue
                   if r.grammar_future is not None]
        if pending:
            pending[0].exception()  # wait for it (its error, if any, is the request's)
        return bool(pending)

    def collect(self) -> dict[str, RunOutput]:
        results: dict[str, RunOutput] = {}
        for out in self.scheduler.outputs:
            for i, rid in enumerate(out.rids):
                r = results.setdefault(rid, RunOutput(rid))
                r.output_ids.extend(out.output_ids[i])
                r.finish_reason = out.finished_reasons[i]
                r.prompt_tokens = out.prompt_tokens[i]
                r.completion_tokens = out.completion_tokens[i]
                r.cached_tokens = out.cached_tokens[i]
                r.total_retractions = out.total_retractions[i]
                for name in LOGPROB_FIELDS:
                    value = getattr(out, name)[i]
                    if value is not None:
                        r.logprobs.setdefault(name, []).extend(value)
        self.scheduler.outputs = []
        return results

    def generate(self, prompts: list[list[int]], sampling_params: dict | None = None,
                 **kwargs) -> list[RunOutput]:
        rids = [self.submit(p, sampling_params, **kwargs) for p in prompts]
        outs = self.run()
        return [outs[r] for r in rids]

    def integrity_error(self) -> str | None:
        return self.scheduler.check_integrity()


class HFRunner:
    """HF transformers on the same model directory, fp32, as the numerical reference."""

    def __init__(self, model_path: str, lora_path: str | None = None):
        from transformers import AutoModelForCausalLM

        with torch_reference_kernels():
            self.model = AutoModelForCausalLM.from_pretrained(model_path,
                                                              dtype=torch.float32).eval()
        if lora_path is not None:  # HF + PEFT, unmerged: the LoRA reference
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, lora_path).eval()

    @torch.no_grad()
    def logits(self, input_ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([input_ids])).logits[0].float()

    @torch.no_grad()
    def greedy(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        """Plain argmax decoding with HF's KV cache, never stopping at EOS (like ignore_eos)."""
        out = self.model(torch.tensor([input_ids]), use_cache=True)
        tokens = []
        for _ in range(max_new_tokens):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = self.model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                             use_cache=True)
        return tokens


_GDN_MODELING = ("transformers.models.qwen3_5.modeling_qwen3_5",)


@contextlib.contextmanager
def torch_reference_kernels():
    """HF's Gated DeltaNet layers bind fla-core's Triton kernels when fla imports (at the import
    of their modeling file); the reference is HF's own torch path, on the CPU. Inside, fla does
    not import, and a modeling file imported before is imported again."""
    saved = sys.modules.get("fla")
    sys.modules["fla"] = None  # import fla -> ImportError
    try:
        for name in _GDN_MODELING:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
        yield
    finally:
        if saved is None:
            sys.modules.pop("fla", None)
        else:
            sys.modules["fla"] = saved


def run_scheduler_with_broken_rank(server_args, port_args, pipe_writer, tp_rank: int) -> None:
    """A scheduler process target whose TP rank 1 fails to load its model (its model path is
    gone): the other ranks then wait for it in the process group's rendezvous."""
    import copy

    from sglab.srt.managers.scheduler import run_scheduler_process

    if tp_rank == 1:
        server_args = copy.copy(server_args)
        server_args.model_path = server_args.model_path + "-missing"
    run_scheduler_process(server_args, port_args, pipe_writer, tp_rank)


def install_eager_graphs(model_runner) -> None:
    """The CUDA graph runners a GPU would build (decode, and prefill where enabled), with
    `EagerGraph` standing in for the CUDA graph: CPU tests drive their padding, buckets and,
    under DP attention, their MAX_LEN layout and per-rank votes."""
    from sglab.srt.model_executor.cuda_graph_runner import CudaGraphRunner, EagerGraph
    from sglab.srt.model_executor.prefill_cuda_graph_runner import PrefillCudaGraphRunner

    model_runner.graph_runner = CudaGraphRunner(model_runner, graph_factory=EagerGraph)
    model_runner.prefill_graph_runner = None
    if model_runner.uses_prefill_graphs():
        model_runner.prefill_graph_runner = PrefillCudaGraphRunner(model_runner,
                                                                   graph_factory=EagerGraph)


def run_scheduler_with_eager_graphs(server_args, port_args, pipe_writer, tp_rank: int) -> None:
    """A scheduler process target whose ranks replay `EagerGraph`s on CPU (see
    install_eager_graphs); every rank captures the same sizes in the same order."""
    from sglab.srt.model_executor.model_runner import ModelRunner
    from sglab.srt.managers.scheduler import run_scheduler_process

    init = ModelRunner.__init__

    def init_with_graphs(self, *args, **kwargs):
        init(self, *args, **kwargs)
        install_eager_graphs(self)

    ModelRunner.__init__ = init_with_graphs
    run_scheduler_process(server_args, port_args, pipe_writer, tp_rank)


def run_scheduler_failing_at_step(server_args, port_args, pipe_writer, tp_rank: int) -> None:
    """A scheduler process target whose TP rank 1 raises inside its 3rd forward (the other
    ranks are then inside, or on their way to, that step's collectives)."""
    from sglab.srt.model_executor.model_runner import ModelRunner
    from sglab.srt.managers.scheduler import run_scheduler_process

    forward, calls = ModelRunner.forward, [0]

    def failing_forward(self, forward_batch):
        calls[0] += 1
        if tp_rank == 1 and calls[0] == 3:
            raise RuntimeError("injected failure on TP rank 1")
        return forward(self, forward_batch)

    ModelRunner.forward = failing_forward
    run_scheduler_process(server_args, port_args, pipe_writer, tp_rank)
