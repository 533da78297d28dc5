"""Tensor-parallel layers, every rank built in one process (explicit tp_rank / tp_size): each
rank's shard of a tp=1 weight, recombined the way the collectives would, gives the tp=1 output."""

from __future__ import annotations

import pytest
import torch

from sglab.srt.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from sglab.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding

torch.manual_seed(0)
X = torch.randn(5, 16)


def _ranks(cls, tp: int, *args, **kwargs) -> list:
    return [cls(*args, tp_rank=r, tp_size=tp, **kwargs) for r in range(tp)]


def _load_full(layer, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    layer.weight.load_full(layer.weight, weight)
    if bias is not None:
        layer.bias.load_full(layer.bias, bias)


@pytest.mark.parametrize("tp", [2, 4])
def test_column_parallel_concat_is_full_output(tp):
    w, b = torch.randn(8, 16), torch.randn(8)
    full = torch.nn.functional.linear(X, w, b)
    ranks = _ranks(ColumnParallelLinear, tp, 16, 8, bias=True)
    for layer in ranks:
        _load_full(layer, w, b)
    torch.testing.assert_close(torch.cat([m(X) for m in ranks], dim=-1), full)


def test_merged_column_holds_its_slice_of_each_block():
    gate, up = torch.randn(12, 16), torch.randn(12, 16)
    ranks = _ranks(MergedColumnParallelLinear, 2, 16, [12, 12])
    for layer in ranks:  # checkpoint path: one tensor per projection
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up, 1)
    for r, layer in enumerate(ranks):
        expect = torch.cat([gate[6 * r:6 * r + 6], up[6 * r:6 * r + 6]])
        torch.testing.assert_close(layer.weight.data, expect)
    dummy = _ranks(MergedColumnParallelLinear, 2, 16, [12, 12])
    for layer in dummy:  # dummy path: the tp=1 fused tensor
        _load_full(layer, torch.cat([gate, up]))
    for a, b in zip(ranks, dummy):
        torch.testing.assert_close(a.weight.data, b.weight.data)


@pytest.mark.parametrize("tp,kv_heads", [(2, 2), (4, 2)])
def test_qkv_splits_heads_and_replicates_kv_heads(tp, kv_heads):
    head, heads = 4, 4
    q, k, v = (torch.randn(n * head, 16) for n in (heads, kv_heads, kv_heads))
    ranks = _ranks(QKVParallelLinear, tp, 16, head, heads, kv_heads)
    for layer in ranks:
        for shard_id, t in zip("qkv", (q, k, v)):
            layer.weight_loader(layer.weight, t, shard_id)
    replicas = max(tp // kv_heads, 1)
    per_q, per_kv = heads // tp, max(kv_heads // tp, 1)
    for r, layer in enumerate(ranks):
        kv_rank = r // replicas
        qs, ks, vs = layer.weight.data.split(layer.output_sizes)
        torch.testing.assert_close(qs, q[r * per_q * head:(r + 1) * per_q * head])
        torch.testing.assert_close(ks, k[kv_rank * per_kv * head:(kv_rank + 1) * per_kv * head])
        torch.testing.assert_close(vs, v[kv_rank * per_kv * head:(kv_rank + 1) * per_kv * head])
    assert [m.num_kv_head_replicas for m in ranks] == [replicas] * tp
    dummy = _ranks(QKVParallelLinear, tp, 16, head, heads, kv_heads)
    for a, b in zip(ranks, dummy):
        _load_full(b, torch.cat([q, k, v]))
        torch.testing.assert_close(a.weight.data, b.weight.data)


def test_row_parallel_partials_sum_to_full_output():
    w = torch.randn(8, 16)
    ranks = _ranks(RowParallelLinear, 2, 16, 8)
    for layer in ranks:
        _load_full(layer, w)
    # Each rank sees its slice of the input; the group of one here leaves the all-reduce out.
    partials = [m(x) for m, x in zip(ranks, X.chunk(2, dim=-1))]
    torch.testing.assert_close(partials[0] + partials[1], X @ w.T, rtol=1e-5, atol=1e-5)


def test_sharded_load_refuses_a_wrong_checkpoint_shape():
    layer = ColumnParallelLinear(16, 8, tp_rank=1, tp_size=2)
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight_loader(layer.weight, torch.randn(10, 16))
    qkv = QKVParallelLinear(16, 4, 4, 2, tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="pre-fused"):
        qkv.weight_loader(qkv.weight, torch.randn(32, 16))


@pytest.mark.parametrize("vocab,tp", [(12, 2), (10, 4)])
def test_vocab_parallel_embedding_pads_and_masks(vocab, tp):
    w = torch.randn(vocab, 6)
    ids = torch.tensor([0, 3, vocab - 1, 5, 1])
    ranks = _ranks(VocabParallelEmbedding, tp, vocab, 6)
    for layer in ranks:
        _load_full(layer, w)
    assert sum(m.weight.shape[0] for m in ranks) == -(-vocab // tp) * tp
    torch.testing.assert_close(sum(m(ids) for m in ranks), w[ids])
    # The head's view: rank slices of the (zero-padded) vocabulary, in rank order.
    logits = torch.cat([X[:, :6] @ m.weight.T for m in ranks], dim=-1)
    torch.testing.assert_close(logits[:, :vocab], X[:, :6] @ w.T)
    assert torch.all(logits[:, vocab:] == 0)


def test_kernel_fusion_prefers_cublaslt_unless_torch_is_told(monkeypatch):
    """prefer_cublaslt routes torch's matmuls to cuBLASLt; a set TORCH_BLAS_PREFER_CUBLASLT
    (either value) is the user's choice and stays."""
    from sglab.srt.layers import linear

    calls = []
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", calls.append)
    monkeypatch.delenv("TORCH_BLAS_PREFER_CUBLASLT", raising=False)
    linear.prefer_cublaslt()
    assert calls == ["cublaslt"]
    for value in ("0", "1"):
        monkeypatch.setenv("TORCH_BLAS_PREFER_CUBLASLT", value)
        linear.prefer_cublaslt()
    assert calls == ["cublaslt"]
