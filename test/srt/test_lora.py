"""Multi-LoRA serving through the scheduler: parity with HF + PEFT, mixed batches, backends,
slot eviction, runtime load/unload, and patches 0005 / 0005b (sync audit, identical outputs)."""

from __future__ import annotations

import random

import pytest
import torch
from sglab.srt.debug.sync_audit import AUDIT
from sglab.srt.managers.io_struct import LoadLoRAAdapterReqInput, UnloadLoRAAdapterReqInput
from sglab.test.lora_utils import (
    edit_adapter_config,
    make_peft_adapter,
    make_random_adapter,
)
from sglab.test.runners import HFRunner, SchedulerRunner

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 8
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
VARIANTS = ["a", "b", "c", None]  # three adapters and the base model
NUM_LAYERS = 2


def _prompts(seed: int, lens=(6, 19)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000) for _ in range(n)] for n in lens]


# Each variant gets its own prompts, so no two requests share outputs by accident.
PROMPTS = {v: _prompts(i) for i, v in enumerate(VARIANTS)}
REQUESTS = [(v, i) for v in VARIANTS for i in range(2)]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    specs = {  # name: (r, alpha, targets)
        "a": (8, 16, ALL_TARGETS),
        "b": (4, 8, ["q_proj", "v_proj"]),
        "c": (16, 8, ["o_proj", "up_proj", "down_proj"]),
        "big": (32, 32, ["q_proj"]),
    }
    return {name: make_peft_adapter(base, str(root / name), r, alpha, targets, seed=i + 1)
            for i, (name, (r, alpha, targets)) in enumerate(specs.items())}


def _lora_paths(adapters, names=("a", "b", "c")) -> list[str]:
    return [f"{n}={adapters[n]}" for n in names]


def _submit(runner: SchedulerRunner, requests, params=GREEDY) -> dict:
    return {(v, i): runner.submit(PROMPTS[v][i], params, return_logprob=True,
                                  logprob_start_len=0, lora_path=v)
            for v, i in requests}


def _outputs(runner: SchedulerRunner, rids: dict, outs=None) -> dict:
    outs = outs if outs is not None else runner.run()
    assert runner.integrity_error() is None
    return {key: outs[rid] for key, rid in rids.items()}


@pytest.fixture(scope="module")
def alone(base, adapters) -> dict:
    """Each request run by itself (no overlap): the reference for batched runs."""
    runner = SchedulerRunner(model_path=base, lora_paths=_lora_paths(adapters),
                             disable_overlap_schedule=True)
    result = {}
    for key in REQUESTS:
        result.update(_outputs(runner, _submit(runner, [key])))
    return result


def _assert_same(got: dict, ref: dict, num_tokens: int = NEW_TOKENS, atol: float = 1e-4):
    for key, out in got.items():
        assert out.output_ids[:num_tokens] == ref[key].output_ids[:num_tokens], key
        a = out.logprobs["input_token_logprobs_val"][1:]
        b = ref[key].logprobs["input_token_logprobs_val"][1:]
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=atol, rtol=1e-4)


def _assert_matches_hf(out, hf: HFRunner, prompt: list[int]) -> None:
    assert out.output_ids == hf.greedy(prompt, NEW_TOKENS)
    ref = torch.log_softmax(hf.logits(prompt), dim=-1)
    expect = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    got = torch.tensor(out.logprobs["input_token_logprobs_val"][1:])
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)


def test_matches_hf_peft(base, adapters, alone):
    for variant in VARIANTS:
        hf = HFRunner(base, adapters[variant] if variant else None)
        for i in range(2):
            _assert_matches_hf(alone[(variant, i)], hf, PROMPTS[variant][i])
    # The adapters do change the outputs.
    hf_base = HFRunner(base)
    for variant in "abc":
        prompt = PROMPTS[variant][0]
        ref = torch.log_softmax(hf_base.logits(prompt), dim=-1)
        base_lp = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        got = torch.tensor(alone[(variant, 0)].logprobs["input_token_logprobs_val"][1:])
        assert (got - base_lp).abs().max() > 0.05, variant


def test_llama_matches_hf_peft(tiny_model_dir, tmp_path):
    """tiny-llama; also the config-only random adapter the GPU benchmarks use."""
    path = tiny_model_dir("tiny-llama")
    made = {"peft": make_peft_adapter(path, str(tmp_path / "peft"), 8, 16, ALL_TARGETS, seed=7),
            "random": make_random_adapter(path, str(tmp_path / "random"), 8, 16, seed=8,
                                          std=0.1, dtype="float32")}
    runner = SchedulerRunner(model_path=path, lora_paths=[f"{n}={p}" for n, p in made.items()])
    prompt = _prompts(11, (13,))[0]
    rids = {name: runner.submit(prompt, GREEDY, return_logprob=True, logprob_start_len=0,
                                lora_path=name) for name in made}
    outs = runner.run()
    for name, adapter in made.items():
        _assert_matches_hf(outs[rids[name]], HFRunner(path, adapter), prompt)


def test_mixed_batch_equals_each_alone(base, adapters, alone):
    runner = SchedulerRunner(model_path=base, lora_paths=_lora_paths(adapters))
    _assert_same(_outputs(runner, _submit(runner, REQUESTS)), alone)


def test_chunked_prefill_with_lora(base, adapters, alone):
    runner = SchedulerRunner(model_path=base, lora_paths=_lora_paths(adapters),
                             chunked_prefill_size=8)
    _assert_same(_outputs(runner, _submit(runner, [("a", 1), ("c", 1), (None, 1)])), alone)


def test_triton_backend_matches_torch_native(base, adapters, alone):
    runner = SchedulerRunner(model_path=base, lora_paths=_lora_paths(adapters),
                             lora_backend="triton")
    requests = [(v, 1) for v in VARIANTS]
    got = _outputs(runner, _submit(runner, requests, {**GREEDY, "max_new_tokens": 3}))
    _assert_same(got, alone, num_tokens=3)


def test_eviction_with_more_adapters_than_slots(base, adapters, alone):
    runner = SchedulerRunner(model_path=base, lora_paths=_lora_paths(adapters),
                             max_loras_per_batch=2)
    manager = runner.scheduler.lora_manager
    pool = manager.memory_pool
    seen = []
    prepare = pool.prepare_lora_batch

    def record(cur_uids, loras, protected_uids=frozenset()):
        seen.append((set(cur_uids), set(protected_uids)))
        return prepare(cur_uids, loras, protected_uids)

    pool.prepare_lora_batch = record
    interleaved = [(v, i) for i in range(2) for v in VARIANTS]  # a b c base a b c base
    _assert_same(_outputs(runner, _submit(runner, interleaved)), alone)
    assert all(len(cur | inflight) <= 2 for cur, inflight in seen)
    assert set().union(*(cur for cur, _ in seen)) == {manager.get_lora_id(n) for n in "abc"} | {
        None}
    assert pool.num_loads > 4  # slots were reused: an evicted adapter was loaded again


def test_load_unload_while_requests_run(base, adapters, alone, tmp_path):
    runner = SchedulerRunner(model_path=base, lora_paths=_lora_paths(adapters, ["a"]),
                             max_lora_rank=16, lora_target_modules=["all"],
                             max_loras_per_batch=3)
    sched = runner.scheduler
    manager = sched.lora_manager
    rids = _submit(runner, [("a", 0), ("a", 1)])
    for _ in range(3):
        sched.run_step()
    assert sched.running_batch.reqs
    out = sched.load_lora_adapter(LoadLoRAAdapterReqInput("b", adapters["b"]))
    assert out.success and out.loaded_adapters == {"a": adapters["a"], "b": adapters["b"]}
    rids.update(_submit(runner, [("b", 0)]))
    sched.run_step()
    a_id = manager.get_lora_id("a")
    out = sched.unload_lora_adapter(UnloadLoRAAdapterReqInput("a"))
    assert out.success and out.loaded_adapters == {"b": adapters["b"]}
    assert a_id in manager.unloading and a_id in manager.loras  # still used by running requests
    late = runner.submit(PROMPTS["a"][0], GREEDY, lora_path="a")
    errors = {
        "does not exist": LoadLoRAAdapterReqInput("x", str(tmp_path / "missing")),
        "rank 32, above --max-lora-rank 16": LoadLoRAAdapterReqInput("big", adapters["big"]),
        "'b' is already loaded": LoadLoRAAdapterReqInput("b", adapters["b"]),
        "DoRA": LoadLoRAAdapterReqInput("d", edit_adapter_config(
            adapters["b"], str(tmp_path / "dora"), use_dora=True)),
    }
    for message, req in errors.items():
        out = sched.load_lora_adapter(req)
        assert not out.success and message in out.error_message
    out = sched.unload_lora_adapter(UnloadLoRAAdapterReqInput("nope"))
    assert not out.success and "'nope' is not loaded" in out.error_message
    outs = runner.run()
    reason = outs[late].finish_reason
    assert reason["type"] == "abort" and reason["status_code"] == 400
    assert "'a' is not loaded" in reason["message"]
    _assert_same(_outputs(runner, rids, outs), alone)
    assert not manager.unloading and a_id not in manager.loras
    # The name can be loaded again; new requests use the new registration.
    assert sched.load_lora_adapter(LoadLoRAAdapterReqInput("a", adapters["a"])).success
    assert manager.get_lora_id("a") != a_id
    _assert_same(_outputs(runner, _submit(runner, [("a", 1)])), alone)


def test_max_loaded_loras_evicts_least_recently_used(base, adapters, alone):
    runner = SchedulerRunner(model_path=base, lora_paths=_lora_paths(adapters, ["a", "b"]),
                             max_loras_per_batch=2, max_loaded_loras=2, max_lora_rank=16)
    sched = runner.scheduler
    _outputs(runner, _submit(runner, [("a", 0)]))  # a is now more recently used than b
    out = sched.load_lora_adapter(LoadLoRAAdapterReqInput("c", adapters["c"]))
    assert out.success and set(out.loaded_adapters) == {"a", "c"}
    _assert_same(_outputs(runner, _submit(runner, [("c", 0), ("a", 1)])), alone)


def test_lora_request_without_lora_enabled(base):
    runner = SchedulerRunner(model_path=base)
    rid = runner.submit(PROMPTS["a"][0], GREEDY, lora_path="a")
    reason = runner.run()[rid].finish_reason
    assert reason["status_code"] == 400 and "--enable-lora" in reason["message"]
    out = runner.scheduler.load_lora_adapter(LoadLoRAAdapterReqInput("a", "/x"))
    assert not out.success and "--enable-lora" in out.error_message


# --- patches 0005 / 0005b ----------------------------------------------------------------------

def _audited_run(base, adapters, patches: str, graph_info: bool):
    AUDIT.reset()
    runner = SchedulerRunner(model_path=base, lora_paths=_lora_paths(adapters),
                             enable_sync_audit=True, patches=patches)
    manager = runner.scheduler.lora_manager
    if graph_info:
        # The CUDA-graph branch on CPU: decode batches fill the static batch info, as the
        # graph runner's replay has them do.
        manager.init_cuda_graph_state(8)
    batches = []
    prepare = manager.prepare_lora_batch

    def record(fb, inflight_ids=None, use_graph=False):
        batches.append((fb.forward_mode.is_decode(), list(fb.lora_ids)))
        graph = use_graph or (graph_info and fb.forward_mode.is_decode())
        return prepare(fb, inflight_ids, graph)

    manager.prepare_lora_batch = record
    requests = [("a", 0), ("b", 1), (None, 0)]
    outs = _outputs(runner, _submit(runner, requests, {**GREEDY, "max_new_tokens": 4}))
    return outs, list(AUDIT.steps), batches


@pytest.mark.parametrize("graph_info", [False, True], ids=["eager", "graph_batch_info"])
def test_patch_0005_0005b_audit(base, adapters, audit, graph_info):
    runs = {p: _audited_run(base, adapters, p, graph_info)
            for p in ("none", "0005", "0005b", "all")}
    for p in ("0005", "0005b", "all"):
        assert {k: o.output_ids for k, o in runs[p][0].items()} == \
            {k: o.output_ids for k, o in runs["none"][0].items()}
        assert {k: o.logprobs for k, o in runs[p][0].items()} == \
            {k: o.logprobs for k, o in runs["none"][0].items()}
    info, update = "LoRAManager.prepare_lora_batch", "LoRAManager.update_lora_info"
    for patches, (_, steps, batches) in runs.items():
        assert len(steps) == len(batches) >= 4
        for step, (is_decode, lora_ids) in zip(steps, batches):
            n_lora = sum(u is not None for u in lora_ids)
            graph = graph_info and is_decode
            # 0005 off: output_offset rebuilt from a list, one blocking copy per qkv layer.
            expect_update = {} if patches in ("0005", "all") else {
                (update, "blocking_h2d"): NUM_LAYERS}
            # 0005b off: a device write per request, plus rank and scaling per adapter request
            # (each indexed by a device scalar), and int(torch.max(seg_lens)) when eager.
            expect_info = {} if patches in ("0005b", "all") else {
                (info, "blocking_h2d"): len(lora_ids) + 2 * n_lora,
                (info, "d2h"): 2 * n_lora + (0 if graph else 1)}
            got = {k: v for k, v in step.items() if k[0] in (info, update)}
            assert got == {**expect_update, **expect_info}, (patches, is_decode, step)


# --- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lora_backend", ["triton", "torch_native"])
@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
def test_gpu_matches_hf_peft(base, adapters, lora_backend, cuda_graph):
    """CUDA graphs (static batch info refilled before replay) and overlap scheduling, fp32."""
    runner = SchedulerRunner(model_path=base, lora_paths=_lora_paths(adapters), device="cuda",
                             dtype="float32", lora_backend=lora_backend, max_loras_per_batch=3,
                             disable_cuda_graph=not cuda_graph, cuda_graph_max_bs=8)
    got = _outputs(runner, _submit(runner, REQUESTS))
    for variant in VARIANTS:
        hf = HFRunner(base, adapters[variant] if variant else None)
        for i in range(2):
            out = got[(variant, i)]
            assert out.output_ids == hf.greedy(PROMPTS[variant][i], NEW_TOKENS), (variant, i)
    assert runner.scheduler.lora_manager.memory_pool.num_loads > 3  # 4 variants, 3 slots


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
def test_gpu_sync_debug_mode_sees_the_lora_syncs(base, adapters, audit, cuda_graph):
    totals, outputs = {}, {}
    for patches in ("none", "all"):
        AUDIT.reset()
        runner = SchedulerRunner(model_path=base, lora_paths=_lora_paths(adapters),
                                 device="cuda", dtype="float32", enable_sync_audit=True,
                                 patches=patches, disable_cuda_graph=not cuda_graph)
        outs = _outputs(runner, _submit(runner, REQUESTS))
        outputs[patches] = {k: o.output_ids for k, o in outs.items()}
        totals[patches] = AUDIT.report()["totals"]
    assert outputs["none"] == outputs["all"]
    for region in ("LoRAManager.prepare_lora_batch", "LoRAManager.update_lora_info"):
        assert totals["none"][region]["cuda_sync"] > 0, region
        assert not totals["all"].get(region), (region, totals["all"].get(region))
