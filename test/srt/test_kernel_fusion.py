"""--kernel-fusion on against off: the same tokens, logprobs within fp32 rounding, the fused
paths really taken, and deterministic mode's schedule invariance kept.

On CPU the fused kernels run in Triton's interpreter (test/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import collections
import random

import pytest
import torch
from transformers import AutoConfig

from sglab.srt.configs.model_options import ModelOptions
from sglab.srt.layers.attention.triton_ops import decode_attention
from sglab.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglab.srt.server_args import ServerArgs, ServerArgsError
from sglab.test import schedule_invariance as sched
from sglab.test.runners import SchedulerRunner, free_gpu_memory

PARAMS = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}
LOGPROB_TOL = 1e-4


def _prompts() -> list[list[int]]:
    """A shared 24-token prefix (a radix hit for the second), one prompt past 64 keys (several
    decode splits), one short."""
    rng = random.Random(0)
    shared = [rng.randrange(1000) for _ in range(24)]
    return [shared + [rng.randrange(1000) for _ in range(n)] for n in (3, 48)] + [
        [rng.randrange(1000) for _ in range(9)]]


def _run(path: str, fusion: str, **kw) -> list:
    runner = SchedulerRunner(model_path=path, kernel_fusion=fusion, **kw)
    prompts = _prompts()
    outs = runner.generate(prompts[:1], PARAMS, return_logprob=True, logprob_start_len=0)
    outs += runner.generate(prompts[1:], PARAMS, return_logprob=True)  # output logprobs only
    assert outs[1].cached_tokens >= 16
    assert runner.integrity_error() is None
    return outs


def _assert_same_outputs(on: list, off: list) -> None:
    assert [o.output_ids for o in on] == [o.output_ids for o in off]
    assert len(on[0].logprobs["input_token_logprobs_val"]) == len(_prompts()[0])
    for a, b in zip(on, off):
        for name, values in a.logprobs.items():
            if name.endswith("_val") and values:  # the first prompt token has None
                got = torch.tensor([x for x in values if x is not None])
                want = torch.tensor([x for x in b.logprobs[name] if x is not None])
                torch.testing.assert_close(got, want, atol=LOGPROB_TOL, rtol=0)


@pytest.mark.parametrize("preset,backend", [("tiny-qwen3", "triton"),
                                            ("tiny-llama", "triton"),
                                            ("tiny-qwen3", "torch_native"),
                                            ("tiny-llama", "torch_native")])
def test_fusion_on_matches_off(tiny_model_dir, preset, backend):
    """Triton: the fused K/V write in prefill, and decode attention in one launch with the q/k
    norm + RoPE and the K/V write; torch_native: the K/V write alone; with (Qwen3) and without
    (Llama) q/k norm."""
    path = tiny_model_dir(preset)
    kw = {"attention_backend": backend, "chunked_prefill_size": 32}
    _assert_same_outputs(_run(path, "on", **kw), _run(path, "off", **kw))


def test_fused_paths_are_taken(tiny_model_dir, monkeypatch):
    """With fusion on, no layer calls set_kv_buffer (the RoPE kernel wrote K/V in prefill, decode
    attention in decode) and every decode attention runs as one launch that also applies the
    q/k norm + RoPE; SGLAB_DECODE_FUSED_ROPE=0 leaves that to the RoPE kernel; off, all run as
    before."""
    calls = {"set_kv_buffer": 0, "merged": 0, "two_stage": 0, "rope": 0}
    set_kv = MHATokenToKVPool.set_kv_buffer
    decode = decode_attention.decode_attention_fwd

    def counting_set_kv(self, *a, **kw):
        calls["set_kv_buffer"] += 1
        return set_kv(self, *a, **kw)

    def counting_decode(*a, merge_count=None, rope=None, **kw):
        calls["merged" if merge_count is not None else "two_stage"] += 1
        calls["rope"] += rope is not None
        return decode(*a, merge_count=merge_count, rope=rope, **kw)

    monkeypatch.setattr(MHATokenToKVPool, "set_kv_buffer", counting_set_kv)
    monkeypatch.setattr("sglab.srt.layers.attention.triton_backend.decode_attention_fwd",
                        counting_decode)
    path = tiny_model_dir("tiny-qwen3")
    counts = {}
    for fusion, fused_rope in (("on", "1"), ("on", "0"), ("off", "1")):
        monkeypatch.setenv("SGLAB_DECODE_FUSED_ROPE", fused_rope)
        calls.update(dict.fromkeys(calls, 0))
        SchedulerRunner(model_path=path, kernel_fusion=fusion,
                        attention_backend="triton").generate(_prompts()[2:], PARAMS)
        counts[fusion, fused_rope] = dict(calls)
    layers, decodes = 2, PARAMS["max_new_tokens"] - 1
    merged = {"set_kv_buffer": 0, "merged": layers * decodes, "two_stage": 0}
    assert counts["on", "1"] == {**merged, "rope": layers * decodes}
    assert counts["on", "0"] == {**merged, "rope": 0}
    assert counts["off", "1"] == {"set_kv_buffer": layers * (1 + decodes), "merged": 0,
                                  "two_stage": layers * decodes, "rope": 0}


def test_small_m_matmuls_fold_the_norms_and_silu(tiny_model_dir, monkeypatch):
    """With the small-M GEMM up to 16 rows (SGLAB_SKINNY_GEMM_MAX_M), serving CPU rows as it
    serves CUDA ones: every layer of a forward of at most 16 tokens runs norm + qkv, o_proj,
    norm + gate_up and SiLU + down_proj as four skinny_gemm launches, and the outputs are
    fusion off's."""
    from sglab.srt.layers import linear
    from sglab.srt.layers import skinny_gemm as sg

    calls = {"norm": 0, "plain": 0, "silu": 0}
    real = sg.skinny_gemm

    def counting(x, w, b=None, prologue=None):
        kind = "norm" if isinstance(prologue, sg.RMSNormPrologue) else \
            "silu" if prologue == sg.SILU_MUL else "plain"
        calls[kind] += 1
        return real(x, w, b, prologue)

    monkeypatch.setenv("SGLAB_SKINNY_GEMM_MAX_M", "16")
    monkeypatch.setattr(linear, "skinny_applies",
                        lambda x, bound: 0 < x.numel() // x.shape[-1] <= bound)
    monkeypatch.setattr(linear, "skinny_gemm", counting)
    path = tiny_model_dir("tiny-qwen3")
    kw = {"attention_backend": "triton", "chunked_prefill_size": 32}
    on = _run(path, "on", **kw)
    assert calls["silu"] >= 2 * (PARAMS["max_new_tokens"] - 1)  # 2 layers, every decode
    assert calls == {"norm": 2 * calls["silu"], "plain": calls["silu"], "silu": calls["silu"]}
    _assert_same_outputs(on, _run(path, "off", **kw))


def test_split_k_table_shapes_go_to_splitk_gemm(tiny_model_dir, monkeypatch):
    """With a split-K table for every tiny-llama matmul (as on CUDA): o_proj and down_proj
    (layouts that beat F.linear) run through splitk_gemm at every M up to MAX_M, qkv (one
    that does not) only with the norm folded in; with SGLAB_SPLITK_FOLD_MAX_M=1 one-row
    decodes fold both norms (qkv, gate_up with SiLU out), other rows up to MAX_M apply SiLU in
    gate_up. The outputs are fusion off's; with the defaults' fold bound (0) and
    SGLAB_SPLITK_SILU=0 the layers fuse nothing."""
    from sglab.srt.layers import linear
    from sglab.srt.layers import splitk_gemm as sk
    from sglab.srt.models.llama import LlamaMLP

    path = tiny_model_dir("tiny-llama")
    cfg = AutoConfig.from_pretrained(path)
    hidden, inter, dim = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * dim
    layouts = {(qkv, hidden): ({"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2}, False),
               (hidden, hidden): ({"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3}, True),
               (2 * inter, hidden): ({"BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": 1}, False),
               (hidden, inter): ({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2}, True)}
    monkeypatch.setattr(sk, "SPLITK_TABLE", {shape: ((1, sk.MAX_M, c, wins),)
                                             for shape, (c, wins) in layouts.items()})
    monkeypatch.delenv("SGLAB_SPLITK_TABLE", raising=False)
    monkeypatch.setenv("SGLAB_SPLITK_FOLD_MAX_M", "1")
    monkeypatch.setattr(linear, "splitk_applies",
                        lambda x: 0 < x.numel() // x.shape[-1] <= sk.MAX_M)
    calls = collections.Counter()

    def counting(x, w, b=None, config=None, prologue=None, silu_out=False):
        assert config is layouts[tuple(w.shape)][0]
        rows = x.numel() // x.shape[-1]
        kind = "norm" if prologue is not None else "plain"
        calls[kind, "silu" if silu_out else "", tuple(w.shape)] += 1
        assert prologue is None or rows <= 1  # the fold bound
        return real(x, w, b, config, prologue, silu_out)

    real = sk.splitk_gemm
    monkeypatch.setattr(linear, "splitk_gemm", counting)
    kw = {"attention_backend": "triton", "chunked_prefill_size": 32}
    on = _run(path, "on", **kw)
    layers, one_row_decodes = cfg.num_hidden_layers, PARAMS["max_new_tokens"] - 1
    assert calls["norm", "", (qkv, hidden)] >= layers * one_row_decodes
    assert calls["norm", "silu", (2 * inter, hidden)] == calls["norm", "", (qkv, hidden)]
    assert calls["plain", "silu", (2 * inter, hidden)] > layers  # prefill chunks, 2-row steps
    assert calls["plain", "", (hidden, hidden)] == calls["plain", "", (hidden, inter)] \
        == sum(n for (_, silu, shape), n in calls.items() if silu)
    assert calls["plain", "", (qkv, hidden)] == 0
    off = _run(path, "off", **kw)
    _assert_same_outputs(on, off)
    monkeypatch.delenv("SGLAB_SPLITK_FOLD_MAX_M")
    monkeypatch.setenv("SGLAB_SPLITK_SILU", "0")
    mlp = LlamaMLP(hidden, inter, torch.float32, ModelOptions(False, False, True))
    linear.enable_decode_gemms(mlp, hidden)
    row = torch.zeros(1, hidden)
    assert mlp.gate_up_proj.splitk_layout(row) is None  # plain: not a winning layout
    assert not mlp.gate_up_proj.folds_norm(row) and not mlp.gate_up_proj.fuses_silu(row)
    assert mlp.down_proj.splitk_layout(torch.zeros(1, inter)) is not None


def test_graph_prologue_in_one_launch_each_gives_the_torch_ops_bits(tiny_model_dir,
                                                                    monkeypatch):
    """Decode graphs (EagerGraph on CPU), 3 rows padded to the graph of 4, long enough for
    several KV splits: the graph's inputs and its attention metadata from one launch each give
    the same tokens and logprob bits as the torch ops (the same runner with the fused prologue
    switched off), and each launch runs once per replay."""
    from sglab.srt.layers.attention import triton_backend
    from sglab.srt.model_executor import cuda_graph_runner
    from sglab.srt.model_executor.cuda_graph_runner import CudaGraphRunner, EagerGraph

    calls = {"decode_inputs": 0, "decode_kv_indices": 0}
    for module, name in ((cuda_graph_runner, "decode_inputs"),
                         (triton_backend, "decode_kv_indices")):
        def counted(*a, _real=getattr(module, name), _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(module, name, counted)
    rng = random.Random(3)
    prompts = [[rng.randrange(1000) for _ in range(n)] for n in (66, 3, 10)]
    runner = SchedulerRunner(model_path=tiny_model_dir("tiny-qwen3"), kernel_fusion="on",
                             attention_backend="triton", cuda_graph_max_bs=4, cuda_graph_bs=[4],
                             disable_radix_cache=True)
    mr = runner.scheduler.tp_worker.model_runner
    mr.graph_runner = CudaGraphRunner(mr, graph_factory=EagerGraph)
    outs, counts = {}, {}
    for fused in (True, False):  # an EagerGraph replay runs the step again: the flags apply
        mr.graph_runner.fused_inputs = mr.attn_backend.fused_graph_prologue = fused
        calls.update(dict.fromkeys(calls, 0))
        outs[fused] = runner.generate(prompts, PARAMS, return_logprob=True)
        counts[fused] = dict(calls)
        assert runner.integrity_error() is None
    replays = PARAMS["max_new_tokens"] - 1
    assert counts[True] == {"decode_inputs": replays, "decode_kv_indices": replays}
    assert counts[False] == {"decode_inputs": 0, "decode_kv_indices": 0}
    assert [o.output_ids for o in outs[True]] == [o.output_ids for o in outs[False]]
    assert [o.logprobs for o in outs[True]] == [o.logprobs for o in outs[False]]


def test_deterministic_schedule_invariance_with_fusion(tiny_model_dir):
    """Deterministic mode keeps the unified-extend decode; the fused q/k norm + RoPE + KV write
    is row-wise, so each request still gets its alone-bits whatever the schedule."""
    runner = SchedulerRunner(model_path=tiny_model_dir("tiny-qwen3"), kernel_fusion="on",
                             attention_backend="triton", enable_deterministic_inference=True,
                             chunked_prefill_size=16)
    assert runner.scheduler.tp_worker.model_runner.attn_backend.merge_count is None
    workload = sched.make_workload(runner.scheduler.model_config.vocab_size, num_groups=1,
                                   per_group=2, prefix_len=16, question_lens=(2, 8),
                                   max_new_tokens=4)
    reference = sched.alone_reference(runner, workload)
    _, mismatches = sched.check_schedules(runner, workload, reference,
                                          ("all at once", "warm radix"))
    assert [str(m) for m in mismatches] == []


@pytest.mark.parametrize("patches,kw", [
    ("none", {}), ("all", {}),
    ("none", {"attention_backend": "triton", "enable_deterministic_inference": True}),
], ids=["off", "on", "off-unified-extend"])
def test_patch_sync_counts_unchanged(tiny_model_dir, audit, patches, kw):
    """Every audited region makes the same host syncs and uploads per step, fusion on or off
    (patches off: upstream's counts, including 0002's per-layer reads; patches on: none)."""
    path, prompts = tiny_model_dir("tiny-qwen3"), _prompts()[::2]
    steps = {}
    for fusion in ("off", "on"):
        audit.reset()
        SchedulerRunner(model_path=path, kernel_fusion=fusion, patches=patches,
                        enable_sync_audit=True, **kw).generate(prompts, PARAMS)
        steps[fusion] = list(audit.steps)
    assert any(steps["off"]) == (patches == "none")  # the audit saw the unpatched syncs
    assert steps["on"] == steps["off"]


def test_fusion_flag_validation(tiny_model_dir, monkeypatch):
    path = tiny_model_dir("tiny-qwen3")
    with pytest.raises(ServerArgsError, match="--kernel-fusion: invalid choice"):
        ServerArgs(model_path=path, kernel_fusion="yes")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ServerArgsError, match="--kernel-fusion on.*TRITON_INTERPRET=1"):
        ServerArgs(model_path=path, kernel_fusion="on")
    assert ServerArgs(model_path=path).kernel_fusion == "off"


def test_fused_rope_switch_validation(monkeypatch):
    from sglab.srt.layers.attention.triton_backend import decode_fused_rope

    monkeypatch.delenv("SGLAB_DECODE_FUSED_ROPE", raising=False)
    assert decode_fused_rope()
    monkeypatch.setenv("SGLAB_DECODE_FUSED_ROPE", "0")
    assert not decode_fused_rope()
    monkeypatch.setenv("SGLAB_DECODE_FUSED_ROPE", "yes")
    with pytest.raises(ValueError, match="SGLAB_DECODE_FUSED_ROPE='yes'"):
        decode_fused_rope()


def test_one_split_tile_override(monkeypatch):
    """SGLAB_DECODE_ONE_SPLIT_TILE puts its tile first for one-split batches, the defaults
    come back without it, and a bad value names the variable."""
    da = decode_attention
    try:
        da.set_one_split_tile("16,2,2")
        assert da._GROUPED_TILES_ONE_SPLIT[0] == (16, 2, 2)
        assert da._GROUPED_TILES_ONE_SPLIT[1:] == da._DEFAULT_ONE_SPLIT
        for bad in ("16,2", "24,2,2", "16,0,2", "a,b,c"):
            with pytest.raises(ValueError, match="SGLAB_DECODE_ONE_SPLIT_TILE"):
                da.set_one_split_tile(bad)
    finally:
        da.set_one_split_tile(None)
    assert da._GROUPED_TILES_ONE_SPLIT == da._DEFAULT_ONE_SPLIT


# --- GPU ---------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-llama"])
def test_gpu_fusion_on_matches_off_with_graphs(tiny_model_dir, monkeypatch, preset):
    """fp32, CUDA graphs and overlap, 24 requests of up to 600 keys (one and several decode
    splits in one batch): the same tokens and logprobs (on CUDA both paths use the same q/k
    norm + RoPE arithmetic, and the one-launch decode merges as stage 2 does). The small-M
    GEMM sums in another order than cuBLAS; it has its own test below."""
    monkeypatch.setenv("SGLAB_SKINNY_GEMM_MAX_M", "0")
    path = tiny_model_dir(preset)
    rng = random.Random(1)
    prompts = [[rng.randrange(1000) for _ in range(rng.randrange(1, 600))] for _ in range(24)]
    params = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    outs = {}
    for fusion in ("off", "on"):
        free_gpu_memory()
        runner = SchedulerRunner(model_path=path, device="cuda", dtype="float32",
                                 attention_backend="triton", cuda_graph_max_bs=16,
                                 chunked_prefill_size=256, kernel_fusion=fusion)
        assert runner.scheduler.tp_worker.model_runner.graph_runner is not None
        outs[fusion] = runner.generate(prompts, params, return_logprob=True)
        assert runner.integrity_error() is None
        del runner
    assert [o.output_ids for o in outs["on"]] == [o.output_ids for o in outs["off"]]
    for a, b in zip(outs["on"], outs["off"]):
        torch.testing.assert_close(torch.tensor(a.logprobs["output_token_logprobs_val"]),
                                   torch.tensor(b.logprobs["output_token_logprobs_val"]),
                                   atol=LOGPROB_TOL, rtol=0)


def _agree_up_to_near_ties(a, b, gap: float = 1e-3) -> int:
    """Tokens equal until the runs part at a near-tie (the reference's top two within `gap`),
    logprobs within LOGPROB_TOL before; returns how many tokens were compared."""
    ids_a, ids_b = a.output_ids, b.output_ids
    n = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), len(ids_a))
    lp_a = a.logprobs["output_token_logprobs_val"][:n]
    torch.testing.assert_close(torch.tensor(lp_a),
                               torch.tensor(b.logprobs["output_token_logprobs_val"][:n]),
                               atol=LOGPROB_TOL, rtol=0)
    if n < len(ids_a):
        top = b.logprobs["output_top_logprobs_val"][n]
        assert top[0] - top[1] < gap, f"parted at token {n} without a near-tie: {top}"
    return n


@pytest.mark.gpu
@cuda
def test_gpu_small_m_gemm_with_graphs_matches_f_linear(tiny_model_dir, monkeypatch):
    """fp32, CUDA graphs, 12 requests (decode at bs <= 12, inside the small-M bound): the
    small-M GEMM with its folded norms and SiLU against the same fusion through F.linear
    (SGLAB_SKINNY_GEMM_MAX_M=0); the GEMMs sum in different orders, so runs may part only
    at a near-tie."""
    path = tiny_model_dir("tiny-qwen3")
    rng = random.Random(2)
    prompts = [[rng.randrange(1000) for _ in range(rng.randrange(1, 300))] for _ in range(12)]
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    outs = {}
    for max_m in ("16", "0"):
        monkeypatch.setenv("SGLAB_SKINNY_GEMM_MAX_M", max_m)
        free_gpu_memory()
        runner = SchedulerRunner(model_path=path, device="cuda", dtype="float32",
                                 attention_backend="triton", cuda_graph_max_bs=16,
                                 kernel_fusion="on")
        outs[max_m] = runner.generate(prompts, params, return_logprob=True,
                                      top_logprobs_num=2)
        assert runner.integrity_error() is None
        del runner
    compared = [_agree_up_to_near_ties(a, b) for a, b in zip(outs["16"], outs["0"])]
    assert sum(compared) >= 0.9 * 12 * params["max_new_tokens"]


@pytest.mark.parametrize("factor, fused", [(1.0, True), (0.5, False)])
def test_partial_rope_never_takes_the_whole_head_kernel(factor: float, fused: bool) -> None:
    """The fused q/k norm + RoPE kernel rotates whole heads: a config with
    partial_rotary_factor < 1 must keep the unfused RoPE (and its unfused K/V write)."""
    from transformers import LlamaConfig

    from sglab.srt.configs.model_options import ModelOptions
    from sglab.srt.models.llama import LlamaAttention

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, partial_rotary_factor=factor)
    options = ModelOptions(batch_invariant=False, sync_free_logits_metadata=True,
                           kernel_fusion=True)
    attn = LlamaAttention(config, 0, torch.float32, options)
    assert attn.rotary_emb.rotary_dim == int(16 * factor)
    assert (attn.fused_qk_rope_ok, attn.fuse_kv_write) == (fused, fused)
