"""The HiSparse swap-in kernel against its torch form: over decode steps of random selections,
the same device slots, residency map, slot tokens, recency and host copies."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from sglab.srt.managers.hisparse_coordinator import HiSparseCoordinator, _DecodeState


@dataclass
class Shape:
    page: int = 4
    top_k: int = 12
    buffer: int = 24
    rows: int = 5
    max_pages: int = 24


TINY, REAL = Shape(), Shape(page=64, top_k=2048, buffer=4096, rows=10, max_pages=512)


class _CopyLog:
    """The host pool's swap-in: records (host slot, device slot) of every copy made."""

    def __init__(self):
        self.copies: list[set] = []

    def load_to_device_per_layer(self, device_pool, host, dst, layer_id):
        keep = dst >= 0
        self.copies.append(set(zip(host[keep].tolist(), dst[keep].tolist())))


def _coordinator(kernel: bool, req_to_page: torch.Tensor, sh: Shape,
                 device: str = "cpu") -> HiSparseCoordinator:
    coord = HiSparseCoordinator.__new__(HiSparseCoordinator)
    coord.buffer_size, coord.page_size, coord.top_k = sh.buffer, sh.page, sh.top_k
    coord.device = torch.device(device)
    coord.swap_kernel = kernel
    coord.host_pool, coord.device_pool = _CopyLog(), None
    coord.req_to_page = req_to_page.to(device)
    # Row r's buffer slot s is device slot 10**6 * (r + 1) + s; slot B is the reserved one.
    coord.req_to_device_buffer = ((torch.arange(sh.rows)[:, None] + 1) * 10**6
                                  + torch.arange(sh.buffer + sh.page)).to(device)
    tables = (1, sh.rows, sh.buffer + 1)
    coord.buffer_tokens = torch.full(tables, -1, dtype=torch.int32, device=device)
    coord.last_used = torch.full(tables, -1, dtype=torch.int32, device=device)
    coord.resident = torch.full((1, (sh.rows * sh.max_pages + 1) * sh.page), -1,
                                dtype=torch.int32, device=device)
    return coord


def _selection(gen, lens: torch.Tensor, rows: torch.Tensor, req_to_page: torch.Tensor,
               sh: Shape):
    """Per row: the sink, the newest page and random others, ascending; positions and host
    slots [bs, top_k]."""
    k = sh.top_k // sh.page
    chosen = []
    for n in lens.tolist():
        last = (n - 1) // sh.page
        others = torch.randperm(last - 1, generator=gen)[:k - 2] + 1
        chosen.append(torch.cat([torch.tensor([0, last]), others]).sort().values)
    chosen = torch.stack(chosen)
    host_pages = torch.gather(req_to_page[rows], 1, chosen)
    offsets = torch.arange(sh.page)
    positions = (chosen[:, :, None] * sh.page + offsets).reshape(len(rows), -1)
    return positions, (host_pages[:, :, None] * sh.page + offsets).reshape(len(rows), -1)


def _compare_steps(sh: Shape, rows: list[int], lens: list[int], steps: int,
                   device: str) -> list[tuple[int, int]]:
    """Runs the torch form on the CPU and the kernel on `device`; (copies, wanted) per step."""
    gen = torch.Generator().manual_seed(0)
    req_to_page = (torch.randperm(sh.rows * sh.max_pages, generator=gen) + 1).view(
        sh.rows, sh.max_pages)
    torch_form = _coordinator(False, req_to_page, sh)
    kernel = _coordinator(True, req_to_page, sh, device)
    rows_t, lens_t = torch.tensor(rows), torch.tensor(lens)
    reserved = torch.arange(len(rows)) + 9 * 10**6
    counts = []
    for step in range(steps):
        positions, host = _selection(gen, lens_t, rows_t, req_to_page, sh)
        outs = []
        for coord, dev in ((torch_form, "cpu"), (kernel, device)):
            coord.state = _DecodeState(rows_t.to(dev), lens_t.to(dev), (lens_t > sh.buffer).to(dev),
                                       None, None, reserved.to(dev), sh.max_pages)
            outs.append(coord.swap_in_selected_pages(0, positions.to(dev), host.to(dev)).cpu())
        sparse = (lens_t > sh.buffer)[:, None].expand_as(positions)
        assert torch.equal(outs[0][sparse], outs[1][sparse]), step
        assert torch.equal(torch_form.resident, kernel.resident.cpu()), step
        for table in ("buffer_tokens", "last_used"):  # column B: the torch form's sink
            assert torch.equal(getattr(torch_form, table)[:, :, :sh.buffer],
                               getattr(kernel, table)[:, :, :sh.buffer].cpu()), (step, table)
        assert torch_form.host_pool.copies[-1] == kernel.host_pool.copies[-1], step
        counts.append((len(kernel.host_pool.copies[-1]),
                       int((sparse & (positions < lens_t[:, None] - 1)).sum())))
        lens_t = lens_t + 1
    return counts


def test_kernel_equals_the_torch_form_step_by_step():
    # the last row is dense (seq_len <= B)
    counts = _compare_steps(TINY, rows=[3, 0, 4], lens=[41, 30, 20], steps=12, device="cpu")
    assert counts[0][0] == counts[0][1]  # an empty buffer: every entry misses
    assert all(0 < c < w for c, w in counts[1:])  # then hits too


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_equals_the_torch_form_at_serving_shapes():
    counts = _compare_steps(REAL, rows=[7, 2, 9, 0], lens=[8192, 20000, 4000, 4097], steps=6,
                            device="cuda")
    assert counts[0][0] == counts[0][1] and all(0 < c < w for c, w in counts[1:])


def test_victims_are_the_least_recently_used_slots():
    """A row whose buffer is full: the misses take the slot idle longest first, then the
    others by slot; hits keep their slots."""
    sh, B = TINY, TINY.buffer
    req_to_page = (torch.arange(sh.rows * sh.max_pages) + 1).view(sh.rows, sh.max_pages)
    for kernel in (False, True):
        coord = _coordinator(kernel, req_to_page, sh)
        coord.buffer_tokens[0, 0, :B] = torch.arange(B, dtype=torch.int32)
        coord.last_used[0, 0, :B] = 36
        coord.last_used[0, 0, 20] = 33  # idle longest
        host = req_to_page[0, :B // sh.page, None] * sh.page + torch.arange(sh.page)
        coord.resident[0, host.reshape(-1)] = torch.arange(B, dtype=torch.int32)
        lens = torch.tensor([40])
        coord.state = _DecodeState(torch.tensor([0]), lens, lens > B, None, None,
                                   torch.tensor([9000]), sh.max_pages)
        # positions 0..7 are resident (hits); 36..38 are not (misses); 39 is the newest
        pos = torch.cat([torch.arange(8), torch.arange(36, 40)])[None]
        hosts = req_to_page[0, pos // sh.page] * sh.page + pos % sh.page
        out = coord.swap_in_selected_pages(0, pos, hosts)
        base = 10**6
        assert out[0, :8].tolist() == (base + torch.arange(8)).tolist()
        assert out[0, -1].item() == 9000  # the newest token: the reserved slot
        assert [s - base for s in out[0, 8:11].tolist()] == [20, 8, 9], kernel
