"""Multi-LoRA under tensor parallelism on CPU (gloo, 2 ranks), against tp=1 as the oracle (which
test_lora checks against PEFT): a batch mixing two adapters and the base model, with patches
0005 / 0005b off and on; and each rank's slot weights cut from the adapter exactly as the base
layer cuts its own weight."""

from __future__ import annotations

import random

import pytest
import torch

from sglab.srt.entrypoints.engine import Engine
from sglab.srt.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from sglab.srt.lora.backend import get_backend_from_name
from sglab.srt.lora.layers import get_lora_layer
from sglab.srt.server_args import ServerArgs
from sglab.test.lora_utils import make_peft_adapter
from sglab.test.runners import SchedulerRunner
from conftest import close_logprobs

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
_rng = random.Random(16)
PROMPTS = [[_rng.randrange(1000) for _ in range(n)] for n in (9, 21)]
# Every variant on the same prompts: the adapters' outputs must differ from the base model's.
VARIANTS = ["a", "c", None]
REQUESTS = [(v, i) for v in VARIANTS for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


@pytest.fixture(scope="module")
def lora_paths(base, tmp_path_factory) -> list[str]:
    """`a` on every projection; `c` on the row-parallel ones only (o_proj, down_proj), where
    the rank-r partial products must be summed over ranks before B."""
    root = tmp_path_factory.mktemp("tp_adapters")
    specs = {"a": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"]),
             "c": (16, ["o_proj", "down_proj"])}
    return [f"{name}=" + make_peft_adapter(base, str(root / name), r, 2 * r, targets,
                                           seed=i + 1, std=0.3)
            for i, (name, (r, targets)) in enumerate(specs.items())]


@pytest.fixture(scope="module")
def tp1(base, lora_paths) -> dict:
    runner = SchedulerRunner(model_path=base, lora_paths=lora_paths)
    rids = {(v, i): runner.submit(PROMPTS[i], GREEDY, return_logprob=True,
                                  logprob_start_len=0, lora_path=v) for v, i in REQUESTS}
    outs = runner.run()
    return {key: (outs[rid].output_ids, outs[rid].logprobs["input_token_logprobs_val"])
            for key, rid in rids.items()}


def test_tp1_reference_sees_the_adapters(tp1):
    for variant in "ac":
        for i in range(len(PROMPTS)):
            got, ref = tp1[(variant, i)][1][1:], tp1[(None, i)][1][1:]
            assert max(abs(x - y) for x, y in zip(got, ref)) > 0.05, (variant, i)


@pytest.mark.parametrize("patches,max_loras_per_batch", [("none", 3), ("all", 2)],
                         ids=["0005_0005b_off", "0005_0005b_on_2_slots"])
def test_tp2_equals_tp1(base, lora_paths, tp1, patches, max_loras_per_batch):
    """With two slots the three variants cannot share a batch: slots are reused on each rank."""
    with Engine(model_path=base, tp_size=2, lora_paths=lora_paths, patches=patches,
                max_loras_per_batch=max_loras_per_batch, enable_integrity_check=True,
                log_level="error", random_seed=0) as engine:
        got = engine.generate(input_ids=[PROMPTS[i] for _, i in REQUESTS],
                              sampling_params=GREEDY, return_logprob=True,
                              logprob_start_len=0, lora_path=[v for v, _ in REQUESTS])
    wrong = [key for key, out in zip(REQUESTS, got) if out["output_ids"] != tp1[key][0] or
             not close_logprobs([v for v, _, _ in out["meta_info"]["input_token_logprobs"]],
                                tp1[key][1])]
    assert wrong == []


def test_lora_tp_args_are_accepted(base):
    args = ServerArgs(model_path=base, tp_size=2, enable_lora=True, max_lora_rank=8,
                      lora_target_modules=["all"])
    assert args.enable_lora and args.tp_size == 2


# --- per-rank slicing, every rank built in one process -----------------------------------------

R = 3  # LoRA rank


def _layers(tp: int) -> dict[str, tuple]:
    """name: (make(tp_rank, input_size) -> base layer, full B rows, full A columns)."""
    return {
        "column": (lambda rank, n: ColumnParallelLinear(n, 8, tp_rank=rank, tp_size=tp), 8, 16),
        "gate_up": (lambda rank, n: MergedColumnParallelLinear(
            n, [8, 8], tp_rank=rank, tp_size=tp), 16, 16),
        "qkv": (lambda rank, n: QKVParallelLinear(n, 4, 4, 2, tp_rank=rank, tp_size=tp),
                32, 16),
        "row": (lambda rank, n: RowParallelLinear(n, 8, tp_rank=rank, tp_size=tp), 8, 16),
    }


@pytest.mark.parametrize("tp", [2, 4])  # at tp 4 the two KV heads are replicated
@pytest.mark.parametrize("name", ["column", "gate_up", "qkv", "row"])
def test_slices_follow_the_base_layer_sharding(tp, name):
    """B's rows (column-parallel) and A's columns (row-parallel) a rank keeps are the rows /
    columns its base layer keeps of a tp=1 weight of the same shape."""
    make, out_full, in_full = _layers(tp)[name]
    backend = get_backend_from_name("torch_native", torch.device("cpu"))
    A, B = torch.randn(1, R, in_full), torch.randn(out_full, R)
    for rank in range(tp):
        wrapper = get_lora_layer(make(rank, in_full), backend, cache_qkv_offset=True)
        a, b = wrapper.slice_lora_a_weights(A), wrapper.slice_lora_b_weights(B)
        if name == "row":
            # A row-parallel layer of input in_full and output R keeps A's columns.
            like_a = RowParallelLinear(in_full, R, tp_rank=rank, tp_size=tp)
            like_a.weight.load_full(like_a.weight, A[0])
            torch.testing.assert_close(a[0], like_a.weight.data)
            torch.testing.assert_close(b, B)
        else:
            # The same column-parallel layer with input R keeps B's rows.
            like_b = make(rank, R)
            like_b.weight.load_full(like_b.weight, B)
            torch.testing.assert_close(b, like_b.weight.data)
            torch.testing.assert_close(a, A)
