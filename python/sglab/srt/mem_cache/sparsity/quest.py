"""Quest page selection for GQA models (as upstream's `QuestAlgorithm`).

Per layer, per KV page and KV head, the elementwise min and max of the page's keys (fp32, one
row per host page: a request's page `p` lives in host page `req_to_page[row, p]`). The score
of a page for a query is `sum over kv heads and dims of max(q * k_max, q * k_min)`, an upper
bound of `q . k` over the page, with `q` the mean of the head group's queries (upstream's GQA
approximation). A decode step attends to the `top_k // page_size` best pages, always including
the first (sink) page and the `num_recent_pages` newest (the newest is partial and holds the
token being decoded); selected positions come out sorted, each once.

Summaries are built from the prefill's keys when a request is staged (`update_prefill_reps`)
and kept by a running min/max as decode fills the newest page (`reset_pages` when a page opens,
`update_decode_reps` at every layer). Every function here runs on fixed shapes with no host
read, so it runs inside the decode CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_PAGES = 16
_BLOCK_ROW = 128


@triton.jit
def _page_scores_kernel(q, k_min, k_max, page_ids, num_pages, out, stride_q, stride_ids,
                        stride_out, width, ROW: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """One program per (row, block of pages): score = sum(max(q * k_max, q * k_min)) over the
    page's summary row; pages past the row's count are -inf and never read."""
    b = tl.program_id(0)
    pages = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    exists = pages < tl.load(num_pages + b)
    ids = tl.load(page_ids + b * stride_ids + pages, mask=exists, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, ROW, BLOCK_R):
        cols = start + tl.arange(0, BLOCK_R)
        in_row = cols < ROW
        qv = tl.load(q + b * stride_q + cols, mask=in_row, other=0.0)
        mask = exists[:, None] & in_row[None, :]
        at = ids[:, None] * ROW + cols[None, :]
        lo = tl.load(k_min + at, mask=mask, other=0.0)
        hi = tl.load(k_max + at, mask=mask, other=0.0)
        acc += tl.sum(tl.maximum(qv[None, :] * hi, qv[None, :] * lo), axis=1)
    acc = tl.where(exists, acc, float("-inf"))
    tl.store(out + b * stride_out + pages, acc, mask=pages < width)


class QuestSelector:
    def __init__(self, num_layers: int, num_host_pages: int, num_kv_heads: int, head_dim: int,
                 page_size: int, num_top_pages: int, num_recent_pages: int, device):
        self.page_size = page_size
        self.num_top_pages = num_top_pages
        self.num_recent_pages = num_recent_pages
        # Host page 0 is never handed out: masked updates land there.
        shape = (num_layers, num_host_pages + 1, num_kv_heads, head_dim)
        self.k_min = torch.full(shape, float("inf"), dtype=torch.float32, device=device)
        self.k_max = torch.full(shape, float("-inf"), dtype=torch.float32, device=device)

    def get_kv_size_bytes(self) -> int:
        return 2 * self.k_min.numel() * self.k_min.element_size()

    # --- summaries ------------------------------------------------------------------------------

    def update_prefill_reps(self, layer_id: int, host_pages: torch.Tensor,
                            keys: torch.Tensor, num_tokens: int) -> None:
        """`keys` [num_tokens, H, D]: a request's first tokens; `host_pages` [ceil(n / page)]
        their pages. The last page may be partial: its summary covers the tokens it has."""
        n_pages, ps = host_pages.numel(), self.page_size
        pad = n_pages * ps - num_tokens
        k = keys.float()
        if pad:
            k_lo = torch.cat([k, k.new_full((pad, *k.shape[1:]), float("inf"))])
            k_hi = torch.cat([k, k.new_full((pad, *k.shape[1:]), float("-inf"))])
        else:
            k_lo = k_hi = k
        self.k_min[layer_id, host_pages] = k_lo.view(n_pages, ps, *k.shape[1:]).amin(dim=1)
        self.k_max[layer_id, host_pages] = k_hi.view(n_pages, ps, *k.shape[1:]).amax(dim=1)

    def reset_pages(self, host_pages: torch.Tensor) -> None:
        """Empty the summaries of pages that start this step, every layer."""
        # index_fill_: `[:, pages] = inf` would upload a host scalar (blocking; refused inside
        # a CUDA-graph capture)
        self.k_min.index_fill_(1, host_pages.reshape(-1).long(), float("inf"))
        self.k_max.index_fill_(1, host_pages.reshape(-1).long(), float("-inf"))

    def update_decode_reps(self, layer_id: int, host_pages: torch.Tensor,
                           keys: torch.Tensor) -> None:
        """Fold each row's new key [bs, H, D] into its page's summary."""
        k = keys.float()
        k_min, k_max = self.k_min[layer_id], self.k_max[layer_id]
        k_min[host_pages] = torch.minimum(k_min[host_pages], k)
        k_max[host_pages] = torch.maximum(k_max[host_pages], k)

    # --- selection ------------------------------------------------------------------------------

    def page_scores(self, layer_id: int, queries: torch.Tensor, host_pages: torch.Tensor,
                    num_pages: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
        """`queries` [bs, Hq, D], `host_pages` [bs, P], `num_pages` [bs] -> scores [bs, P],
        -inf past each row's pages. On CUDA one kernel that reads only the rows' pages (the
        torch form reads `P` pages a row)."""
        bs, num_q_heads, head_dim = queries.shape
        num_kv_heads = self.k_min.shape[2]
        q = queries.float().view(bs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
        q = q.mean(dim=2)  # [bs, Hkv, D]
        if use_kernel is None:
            use_kernel = queries.is_cuda
        if use_kernel:
            return self._page_scores_kernel(layer_id, q.contiguous(), host_pages, num_pages)
        k_min, k_max = self.k_min[layer_id][host_pages], self.k_max[layer_id][host_pages]
        q = q.unsqueeze(1)
        scores = torch.maximum(q * k_max, q * k_min).sum(dim=(2, 3))
        exists = torch.arange(host_pages.shape[1], device=q.device) < num_pages[:, None]
        return torch.where(exists, scores, float("-inf"))

    def _page_scores_kernel(self, layer_id: int, q: torch.Tensor, host_pages: torch.Tensor,
                            num_pages: torch.Tensor) -> torch.Tensor:
        bs, width = host_pages.shape
        k_min, k_max = self.k_min[layer_id], self.k_max[layer_id]
        row = k_min[0].numel()
        assert k_min.is_contiguous() and k_max.is_contiguous() and q.stride(1) * q.shape[1] == row
        assert host_pages.stride(1) == 1 and q.stride(2) == 1
        out = torch.empty((bs, width), dtype=torch.float32, device=q.device)
        grid = (bs, triton.cdiv(width, _BLOCK_PAGES))
        _page_scores_kernel[grid](q, k_min, k_max, host_pages, num_pages, out, q.stride(0),
                                  host_pages.stride(0), out.stride(0), width, ROW=row,
                                  BLOCK_P=_BLOCK_PAGES, BLOCK_R=min(_BLOCK_ROW, row))
        return out

    def retrieve_topk(self, layer_id: int, queries: torch.Tensor, req_to_page: torch.Tensor,
                      seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the selected pages (indices in the request, ascending) [bs, K] and their
        host pages [bs, K]. `req_to_page` [bs, P] the rows' page tables, at least as many
        columns as the longest row has pages; rows with at most K pages get pages past their
        end (callers mask positions >= seq_len)."""
        width = req_to_page.shape[1]
        assert width >= self.num_top_pages, (width, self.num_top_pages)
        last = (seq_lens - 1) // self.page_size  # the newest page
        scores = self.page_scores(layer_id, queries, req_to_page, last + 1)
        page = torch.arange(width, device=seq_lens.device)
        exists = page[None, :] <= last[:, None]
        forced = (page[None, :] == 0) | (page[None, :] > (last - self.num_recent_pages)[:, None])
        scores = torch.where(exists & forced, float("inf"), scores)
        chosen = torch.topk(scores, self.num_top_pages, dim=1, sorted=False).indices
        chosen = chosen.sort(dim=1).values
        return chosen, torch.gather(req_to_page, 1, chosen)
