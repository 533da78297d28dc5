"""Quest page selection: the score bounds q . k over a page, a planted needle is found, the
sink and newest pages are always chosen, positions come out sorted and distinct."""

from __future__ import annotations

import torch

from sglab.srt.mem_cache.sparsity.quest import QuestSelector

LAYERS, KV_HEADS, Q_HEADS, DIM, PAGE = 2, 2, 4, 8, 4


def _selector(num_host_pages: int = 40, top_pages: int = 4, recent: int = 1) -> QuestSelector:
    return QuestSelector(LAYERS, num_host_pages, KV_HEADS, DIM, PAGE, top_pages, recent, "cpu")


def _filled(keys: torch.Tensor, host_pages: torch.Tensor, layer: int = 0) -> QuestSelector:
    quest = _selector()
    quest.update_prefill_reps(layer, host_pages, keys, keys.shape[0])
    return quest


def test_page_score_bounds_every_dot_product_of_the_page():
    torch.manual_seed(0)
    keys = torch.randn(10 * PAGE, KV_HEADS, DIM)
    pages = torch.arange(1, 11)
    quest = _filled(keys, pages)
    q = torch.randn(1, Q_HEADS, DIM)
    scores = quest.page_scores(0, q, pages[None], torch.tensor([10]))[0]
    q_mean = q.view(KV_HEADS, Q_HEADS // KV_HEADS, DIM).mean(1)
    dots = (keys.view(10, PAGE, KV_HEADS, DIM) * q_mean).sum(-1).sum(-1)  # [page, token]
    assert bool((scores[:, None] >= dots - 1e-5).all())
    assert torch.allclose(quest.k_min[0, 1], keys[:PAGE].amin(0))
    assert torch.allclose(quest.k_max[0, 10], keys[-PAGE:].amax(0))


def test_needle_page_is_chosen_with_the_sink_and_the_newest_pages():
    torch.manual_seed(1)
    num_pages = 12
    q = torch.randn(1, Q_HEADS, DIM)
    direction = q.view(KV_HEADS, Q_HEADS // KV_HEADS, DIM).mean(1)
    keys = 0.05 * torch.randn(num_pages * PAGE, KV_HEADS, DIM)
    keys[:PAGE] = -direction  # the sink: anti-aligned, chosen anyway
    keys[-PAGE:] = -direction  # the newest page too
    keys[7 * PAGE + 2] = 5 * direction  # the needle, in page 7
    host_pages = torch.randperm(num_pages) + 1  # any host pages
    quest = _filled(keys, host_pages)
    seq_len = torch.tensor([num_pages * PAGE - 1])  # the newest page is partial
    chosen, chosen_host = quest.retrieve_topk(0, q, host_pages[None], seq_len)
    assert chosen[0].tolist()[0] == 0 and 7 in chosen[0].tolist()
    assert chosen[0].tolist()[-1] == num_pages - 1
    assert chosen[0].tolist() == sorted(set(chosen[0].tolist())) and chosen.shape == (1, 4)
    assert torch.equal(chosen_host[0], host_pages[chosen[0]])
    # Without the needle, page 7 is not chosen: the test sees the needle, not an accident.
    keys[7 * PAGE + 2] = 0.0
    assert 7 not in _filled(keys, host_pages).retrieve_topk(0, q, host_pages[None],
                                                             seq_len)[0][0].tolist()


def test_pages_past_the_sequence_are_never_chosen_and_recent_pages_always_are():
    torch.manual_seed(2)
    quest = _selector(top_pages=4, recent=2)
    keys = torch.randn(20 * PAGE, KV_HEADS, DIM)
    host_pages = torch.arange(1, 21)
    quest.update_prefill_reps(1, host_pages, keys, keys.shape[0])
    q = torch.randn(2, Q_HEADS, DIM)
    seq_lens = torch.tensor([9 * PAGE + 1, 20 * PAGE])
    chosen, _ = quest.retrieve_topk(1, q, host_pages[None].expand(2, -1), seq_lens)
    assert bool((chosen[0] <= 9).all()) and {0, 8, 9} <= set(chosen[0].tolist())
    assert {0, 18, 19} <= set(chosen[1].tolist())
    assert all(len(set(row)) == 4 for row in chosen.tolist())


def test_decode_updates_keep_a_running_min_and_max():
    quest = _selector()
    quest.reset_pages(torch.tensor([3]))
    keys = torch.randn(PAGE, KV_HEADS, DIM)
    for k in keys:
        quest.update_decode_reps(1, torch.tensor([3]), k[None])
    assert torch.equal(quest.k_min[1, 3], keys.amin(0))
    assert torch.equal(quest.k_max[1, 3], keys.amax(0))
    assert bool((quest.k_min[0, 3] == float("inf")).all())  # other layers untouched


def test_scoring_kernel_matches_the_torch_form():
    torch.manual_seed(3)
    quest = _selector(num_host_pages=30)
    for layer in range(LAYERS):
        keys = torch.randn(30 * PAGE, KV_HEADS, DIM)
        quest.update_prefill_reps(layer, torch.randperm(30) + 1, keys, keys.shape[0])
    q = torch.randn(3, Q_HEADS, DIM)
    pages = torch.stack([torch.randperm(30)[:20] + 1 for _ in range(3)])
    num_pages = torch.tensor([20, 7, 1])
    torch_form = quest.page_scores(1, q, pages, num_pages, use_kernel=False)
    kernel = quest.page_scores(1, q, pages, num_pages, use_kernel=True)
    assert torch.isinf(kernel[1, 7:]).all() and (kernel[1, 7:] < 0).all()
    assert torch.allclose(kernel, torch_form, rtol=1e-5, atol=1e-5)
