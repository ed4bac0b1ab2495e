"""Composition (score x select): one method's scores with another method's selection."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.tokens.compose import Compose, unit_range
from prunekit.tokens.context import TokenContext
from prunekit.tokens.methods.divprune import DivPrune
from tiny import VLMS, reset, vlm_inputs


def _ctx(tokens: torch.Tensor) -> TokenContext:
    return TokenContext(stage="vision", tokens=tokens)


def test_divprune_selection_with_scores_hand_worked():
    x = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])  # unit vectors
    scores = torch.tensor([[0.0, 1.0, 0.1]])  # already in unit range
    # cosine distances: d01 = .4, d02 = 1, d12 = .2; nearest other token: t0 .4, t1 .2, t2 .2
    # weight 0 (DivPrune): first t0 (.4), then the farthest from {t0}: t2 (1 vs .4)   -> [0, 2]
    # weight .5: first max .5*s + .5*nearest: t0 .2, t1 .6, t2 .15            -> t1
    #            then .5*s + .5*d(., t1):    t0 .2, t2 .05 + .1 = .15          -> t0  -> [0, 1]
    # weight 1: the top-2 scores                                                -> [1, 2]
    ctx = _ctx(x)
    assert DivPrune().select_scored(ctx, 2, scores, weight=0.0).keep.tolist() == [[0, 2]]
    assert DivPrune().select(ctx, 2).keep.tolist() == [[0, 2]]
    assert DivPrune().select_scored(ctx, 2, scores, weight=0.5).keep.tolist() == [[0, 1]]
    assert DivPrune().select_scored(ctx, 2, scores, weight=1.0).keep.tolist() == [[1, 2]]


def test_unit_range():
    torch.testing.assert_close(
        unit_range(torch.tensor([[2.0, 4.0, 3.0], [1.0, 1.0, 1.0]])),
        torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]]),
    )


def _kept(model, inp, method, **opts):
    reset(model)
    with torch.no_grad(), prunekit.prune_tokens(model, method, keep=0.5, **opts) as s:
        model(**inp)
    return s.stats.kept_masks[0]


def test_cls_scores_with_holov_selection_equal_holov():
    """HoloV ranks by [CLS] attention; FasterVLM's score is that row, so the composition is HoloV."""
    model = VLMS["llava"]("sdpa")
    inp = vlm_inputs("llava", model, 2)
    assert torch.equal(
        _kept(model, inp, "fastervlm+holov", num_crops=4), _kept(model, inp, "holov", num_crops=4)
    )


def test_hiprune_scores_with_divprune_selection_through_the_public_api():
    model = VLMS["llava"]("sdpa")
    inp = vlm_inputs("llava", model, 2)
    pure = _kept(model, inp, "divprune")
    composed = _kept(model, inp, Compose("hiprune", "divprune", {"object_layer": 1}, weight=0.0))
    assert torch.equal(composed, pure)  # weight 0: diversity alone
    by_score = _kept(model, inp, "hiprune+divprune", object_layer=1, weight=1.0)
    top = _kept(model, inp, "hiprune+fastervlm", object_layer=1)  # a top-k selector on the same scores
    assert torch.equal(by_score, top) and not torch.equal(by_score, pure)


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("divprune+fastervlm", {}, "no per-token score"),
        ("fastervlm+visionzip", {}, "selects by its own rule"),
        ("fastervlm+divprune", {"zzz": 1}, r"unknown option\(s\) \['zzz'\].*composition takes \['weight'\]"),
        ("fastv+divprune", {}, "no common stage"),
        ("fastervlm+divprune", {"weight": 2.0}, r"weight must be in \[0, 1\]"),
        ("fastv+pyramiddrop", {}, "progressive"),
        ("fastervlm+nosuch", {}, "nosuch"),
    ],
)
def test_bad_compositions_are_refused_clearly(name, opts, match):
    model = VLMS["llava"]("sdpa")
    with pytest.raises((ValueError, prunekit.UnknownMethodError), match=match):
        with prunekit.prune_tokens(model, name, keep=0.5, **opts):
            pass
