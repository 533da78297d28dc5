"""A decode graph's inputs from its static rows (`CudaGraphRunner._step`): positions
(`seq_lens - 1`), input ids (each row's last sampled token, from the FutureMap) and the new
token's slot written into `req_to_token`. `decode_inputs_torch` is the plain form (three torch
ops, about five kernels); `--kernel-fusion on` does the same in one Triton launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglab.srt.managers.overlap_utils import FutureMap


def decode_inputs_torch(seq_lens: torch.Tensor, rows: torch.Tensor, out_cache_loc: torch.Tensor,
                        future_map: FutureMap, req_to_token: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    positions = seq_lens - 1
    input_ids = future_map.gather(rows)
    req_to_token[rows, positions] = out_cache_loc.to(torch.int32)
    return positions, input_ids


@triton.jit
def _decode_inputs_kernel(lens_ptr, rows_ptr, loc_ptr, future_ptr, req_to_token, pos_ptr,
                          ids_ptr, bs, stride, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < bs
    pos = tl.load(lens_ptr + i, mask=mask, other=1) - 1
    row = tl.load(rows_ptr + i, mask=mask, other=0).to(tl.int64)
    tl.store(pos_ptr + i, pos, mask=mask)
    tl.store(ids_ptr + i, tl.load(future_ptr + row, mask=mask, other=0), mask=mask)
    loc = tl.load(loc_ptr + i, mask=mask, other=0).to(tl.int32)
    tl.store(req_to_token + row * stride + pos.to(tl.int64), loc, mask=mask)


def decode_inputs(seq_lens: torch.Tensor, rows: torch.Tensor, out_cache_loc: torch.Tensor,
                  future_map: FutureMap, req_to_token: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, input ids), and req_to_token[rows, positions] = out_cache_loc; one launch.
    Padding rows share the padding row and slot, so their duplicate writes agree."""
    bs, future_tokens = seq_lens.shape[0], future_map.token_ids
    assert req_to_token.stride(1) == 1
    positions = torch.empty_like(seq_lens)
    input_ids = torch.empty(bs, dtype=future_tokens.dtype, device=future_tokens.device)
    if bs:
        block = min(1024, triton.next_power_of_2(bs))
        _decode_inputs_kernel[(triton.cdiv(bs, block),)](
            seq_lens, rows, out_cache_loc, future_tokens, req_to_token, positions, input_ids,
            bs, req_to_token.stride(0), BLOCK=block)
    return positions, input_ids
