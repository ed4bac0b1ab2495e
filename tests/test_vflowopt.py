"""VFlowOpt (vision stage): importance from global tokens and recycling, on hand-worked cases."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.tokens.context import TokenContext, topk_sorted
from prunekit.tokens.methods.vflowopt import VFlowOpt, cell_ids, importance, recycle


def test_importance_is_the_mean_row_of_the_global_tokens():
    M = torch.tensor(
        [
            [0.1, 0.7, 0.1, 0.1],
            [0.1, 0.6, 0.2, 0.1],
            [0.0, 0.8, 0.0, 0.2],
            [0.5, 0.1, 0.1, 0.3],
        ]
    )  # received: [.175, .55, .1, .175], mean .25
    A = M[None, None].expand(1, 2, 4, 4)  # two identical heads
    # t = 2: only token 1 is global (.55 > .5) -> its row
    torch.testing.assert_close(importance(A, 2.0), M[1][None])
    # t = 0.6: tokens 0, 1, 3 (> .15) -> the mean of their rows
    torch.testing.assert_close(importance(A, 0.6), M[[0, 1, 3]].mean(dim=0)[None])
    # t = 100: nobody passes (official: NaN) -> the most attended token, 1
    torch.testing.assert_close(importance(A, 100.0), M[1][None])


def test_cells_follow_floor_of_row_and_col_over_m():
    ids, n = cell_ids(4, 4, 2.0)
    assert n == 4 and ids.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    ids, n = cell_ids(4, 4, 100.0)  # m larger than the grid: one cell
    assert n == 1 and bool((ids == 0).all())


def test_one_cell_recycles_all_dropped_tokens_into_their_best_slot():
    x = torch.arange(6, dtype=torch.float).view(1, 6, 1) * torch.tensor([1.0, 10.0])  # (1, 6, 2)
    imp = torch.tensor([[0.5, 0.1, 0.9, 0.2, 0.3, 0.0]])
    keep, values = recycle(x, imp, torch.zeros(6, dtype=torch.long), 1, k=3)
    # direct: the k - C = 2 best (tokens 2, 0); dropped 1, 3, 4, 5 -> one token at 4 (imp .3)
    assert keep.tolist() == [[0, 2, 4]]
    w = torch.tensor([0.1, 0.2, 0.3, 0.0])
    mean = (w[:, None] * x[0, [1, 3, 4, 5]]).sum(0) / w.sum()
    torch.testing.assert_close(values[0], torch.stack([x[0, 0], x[0, 2], mean]))


def test_exactly_k_survive_when_a_cell_is_empty():
    # 2 cells of 2 tokens; both tokens of cell 1 are direct -> cell 1 is empty, its slot goes to
    # the best remaining dropped token as it is
    x = torch.randn(1, 4, 3)
    imp = torch.tensor([[0.1, 0.3, 0.9, 0.8]])
    keep, values = recycle(x, imp, torch.tensor([0, 0, 1, 1]), 2, k=4 - 1)
    assert keep.tolist() == [[1, 2, 3]]
    w = torch.tensor([0.1, 0.3])
    torch.testing.assert_close(values[0, 0], (w[:, None] * x[0, [0, 1]]).sum(0) / w.sum())
    torch.testing.assert_close(values[0, 1:], x[0, [2, 3]])


def test_select_on_a_grid_keeps_k_and_writes_merged_values():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(2, 2, 16, 16, generator=g).softmax(-1)
    x = torch.randn(2, 16, 4, generator=g)
    ctx = TokenContext(stage="vision", tokens=x, signals={"attention_map": A})
    sel = VFlowOpt(m=2.0).select(ctx, 8)  # 4x4 grid, 2x2 cells -> 4 direct + up to 4 recycled
    assert sel.keep.shape == (2, 8) and sel.values.shape == (2, 8, 4)
    assert bool((sel.keep.diff(dim=-1) > 0).all())
    plain = VFlowOpt(recycle=False).select(ctx, 8)
    assert plain.values is None
    torch.testing.assert_close(
        plain.keep,
        torch.sort(importance(A, 39.26).argsort(dim=-1, descending=True, stable=True)[:, :8]).values,
    )


def test_entropy_term_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"alpha_v=0\.5.*raw pixel patches"):
        VFlowOpt(alpha_v=0.5)


def test_runs_on_llava_through_the_public_api():
    from tiny import VLMS, vlm_inputs

    model = VLMS["llava"]("sdpa")
    inp = vlm_inputs("llava", model, 2)
    with torch.no_grad(), prunekit.prune_tokens(model, "vflowopt", keep=8, m=2.0) as s:
        out = model(**inp).logits
    assert torch.isfinite(out).all() and s.stats.tokens_kept == 16


# ------------------------------------------------------------------ the LLM stage
def test_llm_stage_drops_by_the_vision_importance_of_the_survivors():
    """A vision-stage session publishes each survivor's importance; the nested llm-stage session
    keeps, at its cut, exactly the top of those scores (recycled tokens carry their slot's score)."""
    import prunekit
    from tiny import VLMS, reset, vlm_inputs

    model = VLMS["llava"]("sdpa")
    inp = vlm_inputs("llava", model, 2)
    seen = {}
    with torch.no_grad():
        reset(model)
        method = VFlowOpt(t=1.0, llm_layers=(2,))
        with prunekit.prune_tokens(model, method, keep=0.5) as vis:
            orig = vis.method.select

            def spy(ctx, k):
                sel = orig(ctx, k)
                if ctx.stage == "vision":
                    seen["vision"] = (sel, importance(ctx.signal("attention_map"), 1.0))
                else:
                    seen.setdefault("llm", []).append((ctx.signal("vision_importance").clone(), sel.keep))
                return sel

            vis.method.select = spy
            with prunekit.prune_tokens(model, vis.method, keep=0.6, stage="llm") as llm:
                out = model.generate(**inp, max_new_tokens=3, do_sample=False)
    sel, imp = seen["vision"]
    torch.testing.assert_close(sel.scores, imp.gather(1, sel.keep))  # published: the kept tokens' importance
    (scores, keep), *_ = seen["llm"]
    assert scores.shape == sel.scores.shape  # the llm stage sees every vision survivor, in order
    torch.testing.assert_close(scores, sel.scores.float())
    assert torch.equal(keep, topk_sorted(scores, keep.shape[1]))
    assert llm.stats.tokens_kept < llm.stats.tokens_in and out.shape[1] == inp["input_ids"].shape[1] + 3


def test_llm_stage_without_a_vision_session_says_what_it_needs():
    import prunekit
    from tiny import VLMS, reset, vlm_inputs

    model = VLMS["llava"]("sdpa")
    inp = vlm_inputs("llava", model, 1)
    reset(model)
    with pytest.raises(prunekit.errors.SignalUnavailableError, match="vision-stage session"):
        with torch.no_grad(), prunekit.prune_tokens(model, "vflowopt", keep=0.5, stage="llm"):
            model(**inp)


# ------------------------------------------------------------------ flow-guided search
def test_flow_objective_is_one_when_everything_is_kept_and_search_picks_its_best_trial():
    from prunekit.tokens.methods.vflowopt import flow_objective, flow_search
    from tiny import VLMS, reset, vlm_inputs

    model = VLMS["llava"]("sdpa")
    samples = [vlm_inputs("llava", model, 1, seed=s) for s in range(2)]
    reset(model)
    assert flow_objective(model, samples, VFlowOpt(), 1.0) == pytest.approx(1.0, abs=1e-5)
    res = flow_search(model, samples, keep=0.3, trials=4, seed=1, progress=False)
    assert len(res.history) == 4 and res.history[0]["t"] == 39.26 and res.history[0]["m27"] == 17.39
    assert res.objective == max(h["objective"] for h in res.history) < 1.0
    # the reported objective is reproduced by an independent evaluation of the chosen options
    assert flow_objective(model, samples, VFlowOpt(**res.best), 0.3) == pytest.approx(res.objective, abs=1e-6)
    again = flow_search(model, samples, keep=0.3, trials=4, seed=1, progress=False)
    assert again.history == res.history  # seeded
    with pytest.raises(ValueError, match="no calibration samples"):
        flow_search(model, [], keep=0.3)
