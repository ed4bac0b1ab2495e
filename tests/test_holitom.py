"""HoliTom: temporal segmentation by hand, static / dynamic handling on made-up videos, the
sequential inner merge against a loop, and both stages on a tiny LLaVA with 3-frame videos."""

from __future__ import annotations

import pytest
import torch

import prunekit
from invariants import assert_same, snapshot
from prunekit.tokens.context import Signal, TokenContext
from prunekit.tokens.merge import dpc_knn_merge
from prunekit.tokens.methods.holitom import HoliTom, segments, sequential_merge
from tiny import IMG, VLMS, _left_pad


def test_segmentation_hand_case_from_the_spec():
    """T=3, n=2: position 0 stable over all frames, position 1 never: gain(0,2) = 1*2 = 2 beats
    two segments of gain 1 -> one segment [0, 2], 2 tokens saved."""
    sim = torch.tensor([[0.9, 0.1], [0.95, 0.2]])
    assert segments(sim, 0.8) == ([(0, 2)], 2)
    assert segments(torch.full((3, 4), 0.1), 0.8) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0)
    # frames 0-1 alike, 2-3 alike, a cut between: two segments of 4 stable positions
    sim = torch.tensor([[0.9] * 4, [0.0] * 4, [0.9] * 4])
    assert segments(sim, 0.8) == ([(0, 1), (2, 3)], 8)


def _ctx(frames: torch.Tensor, attn: torch.Tensor) -> TokenContext:
    """frames ``(T, n, D)``, received attention ``(T, n)`` -> a one-video context whose attention
    map has every row equal to ``attn`` (so the received attention is ``attn``)."""
    T, n, D = frames.shape
    A = attn[:, None, None, :].expand(T, 1, n, n)
    return TokenContext(
        stage="vision", tokens=frames.reshape(1, T * n, D), signals={"attention_map": A[None]}
    )


def test_identical_frames_make_one_static_segment_clustered_like_one_frame():
    g = torch.Generator().manual_seed(0)
    frame = torch.randn(8, 4, generator=g)
    ctx = _ctx(frame.expand(3, 8, 4).clone(), torch.rand(3, 8, generator=g))
    sel = HoliTom().select(
        ctx, 6
    )  # rho = 6/24, saved = 8*2 = 16 -> rho' = 0.25 / (8/24) = 0.75 -> 6 clusters
    mean, centres = dpc_knn_merge(frame[None], 6, k=6)
    want = 0.6 * frame[centres[0]] + 0.4 * mean[0]
    assert sel.keep.tolist() == [sorted(centres[0].tolist())]  # slots of the centres in frame 0
    order = torch.argsort(centres[0])
    torch.testing.assert_close(sel.values[0], want[order])


def test_noise_frames_keep_the_most_attended_tokens_of_each_frame():
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(2, 6, 16, generator=g)  # consecutive cosines far below 0.8: all dynamic
    attn = torch.rand(2, 6, generator=g)
    sel = HoliTom().select(_ctx(frames, attn), 4)  # rho = 1/3 -> ceil(6/3) = 2 per frame
    want = [int(i) for t in range(2) for i in (t * 6 + torch.topk(attn[t], 2).indices).tolist()]
    assert sel.keep[0].tolist() == sorted(want)
    torch.testing.assert_close(sel.values[0], frames.reshape(12, 16)[sorted(want)])


def test_sequential_merge_equals_the_official_loop():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(9, 5, generator=g)
    keep = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    dest = torch.tensor([0, 3, 0, 3, 0, 5, 3, 3, 0])
    ref = h.clone()
    for j in range(9):  # in index order
        if not keep[j]:
            ref[dest[j]] = (ref[dest[j]] + h[j]) / 2
    got = sequential_merge(h, keep, dest)
    torch.testing.assert_close(got[keep], ref[keep])
    # batched: each row as on its own
    batched = sequential_merge(
        torch.stack([h, h.flip(0)]), torch.stack([keep, keep]), torch.stack([dest, dest])
    )
    torch.testing.assert_close(batched[0], got)
    torch.testing.assert_close(batched[1][keep], sequential_merge(h.flip(0), keep, dest)[keep])


def test_inner_merge_hand_case_from_the_spec():
    """r = 0.5 on 4 tokens, tokens 2 and 3 duplicate 0 and 1 and are the least attended: 0 and 1
    are kept, unchanged (averages of equal vectors)."""
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    ctx = TokenContext(
        stage="llm", tokens=h[None], signals={"last_token_attention": torch.tensor([[0.4, 0.3, 0.2, 0.1]])}
    )
    sel = HoliTom().select(ctx, 2)
    assert sel.keep.tolist() == [[0, 1]]
    torch.testing.assert_close(sel.values[0], h[:2])


def _video_inputs(model, frames: int = 3, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    base = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
    pv = torch.stack([base + 0.05 * t * torch.randn(base.shape, generator=g) for t in range(frames)], 1)
    rows = []
    for b in range(batch):
        pre = torch.randint(3, 200, (4 - b,), generator=g).tolist()
        body = [tok for _ in range(frames) for tok in (7, *[IMG] * n)]
        rows.append([1, *pre, *body, 9, 10, 11])
    ids, am = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv.flatten(0, 1))


def test_both_stages_run_on_frame_sequences_keep_the_budget_and_restore():
    model = VLMS["llava"]("sdpa")
    inp = _video_inputs(model)
    n_vis = int((inp["input_ids"] == IMG).sum())
    with torch.no_grad():
        dense = model.generate(**inp, max_new_tokens=3, do_sample=False)
    before = snapshot(model)  # after a first forward: transformers adds its own output-capturing hooks
    with torch.no_grad():
        with prunekit.prune_tokens(model, "holitom", keep=0.25) as vis:
            with prunekit.prune_tokens(model, "holitom", keep=0.5, stage="llm") as llm:
                out = model.generate(**inp, max_new_tokens=3, do_sample=False)
        with prunekit.prune_tokens(model, "holitom", keep=1.0):
            same = model.generate(**inp, max_new_tokens=3, do_sample=False)
    assert vis.stats.tokens_in == n_vis and vis.stats.tokens_kept == 2 * round(0.25 * n_vis / 2)
    assert llm.stats.tokens_in == vis.stats.tokens_kept and out.shape == dense.shape
    assert torch.equal(same, dense)
    assert_same(before, snapshot(model))


def test_bad_options_are_refused_and_the_llm_stage_reads_layer_k_minus_1():
    with pytest.raises(ValueError, match="tau"):
        HoliTom(tau=2.0)
    assert HoliTom().needs("llm") == (Signal("last_token_attention", None),)
