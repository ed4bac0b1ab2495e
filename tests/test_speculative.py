"""Speculative decoding with draft trees (issue 24): the decode loop equals greedy ``generate()`` token
for token for every drafter and tree size, on Llama, Qwen2, Mistral and Gemma-3 below its window;
the parts against hand-worked cases (the Token Recycling fill and update, retrieval tries, fusion,
pruning by the draft, the fitted budget) or independent reference forwards (the truncated draft
model, the draft tree's scores); and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from prunekit.errors import UnsupportedModelError
from prunekit.speculative import (
    RASD,
    DraftModelTree,
    ForwardCosts,
    TokenRecycling,
    TreeDraft,
    TreeTemplate,
    fit_budget,
    fuse,
    generate,
    official_paths,
    paths,
    prompt_lookup_tree,
    prune_by_draft,
    truncated,
)
from prunekit.speculative.recycling import closed_rates
from prunekit.speculative.retrieval import BOTH, DRAFT, RETRIEVAL
from prunekit.speculative.tree import Verified
from tiny import llama, mistral, qwen2


def prompt(length: int = 24, seed: int = 1, vocab: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([1]), torch.randint(3, vocab, (length - 1,), generator=g)])[None]


def greedy(model, ids, new: int, eos=None) -> torch.Tensor:
    return model.generate(ids, do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=0)


# ------------------------------------------------------------------ the decode loop equals greedy
DRAFTERS = [
    (None, {}),
    ("token_recycling", {}),
    ("rasd", {"draft_layers": 2}),
    ("draft_tree", {"draft_layers": 1}),
    ("prompt_lookup", {}),
]


@pytest.mark.parametrize("tree", ["official", "auto", 0, 3])
@pytest.mark.parametrize(("drafter", "options"), DRAFTERS, ids=[str(d) for d, _ in DRAFTERS])
def test_generate_equals_greedy_generate(drafter, options, tree):
    m = llama("sdpa")
    ids = prompt()
    ref = greedy(m, ids, 40, eos=[])
    out = generate(
        m, ids, drafter, max_new_tokens=40, tree=tree, eos_token_id=[], calibrate=3, refit=4, **options
    )
    assert torch.equal(out.sequences, ref)
    s = out.stats
    assert s.new_tokens == 40 and 1 <= s.forwards <= 40
    assert s.mat == pytest.approx(40 / s.forwards)
    if drafter is None or tree == 0:
        assert s.forwards == 40 and s.nodes == 0


@pytest.mark.parametrize("family", [qwen2, mistral])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_other_families_and_eager(family, attn):
    m = family(attn)
    ids = prompt(seed=3)
    ref = greedy(m, ids, 30, eos=[])
    for drafter in ("token_recycling", "prompt_lookup"):
        out = generate(m, ids, drafter=drafter, max_new_tokens=30, tree="official", eos_token_id=[])
        assert torch.equal(out.sequences, ref), drafter


def test_stops_at_eos_like_generate():
    m = llama("sdpa")
    ids = prompt(seed=5)
    free = greedy(m, ids, 30, eos=[])[0, ids.shape[1] :].tolist()
    eos = free[7]  # a token the model emits early: generation must stop right after it
    ref = greedy(m, ids, 30, eos=eos)
    for drafter in ("token_recycling", "prompt_lookup", None):
        out = generate(m, ids, drafter=drafter, max_new_tokens=30, tree="official", eos_token_id=eos)
        assert torch.equal(out.sequences, ref), drafter
        assert out.sequences[0, -1] == eos and out.stats.new_tokens == free.index(eos) + 1


def test_gemma3_below_its_window_and_a_clear_error_beyond():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=128,
                           layer_types=["sliding_attention"] * 3 + ["full_attention"])  # fmt: skip
    cfg._attn_implementation = "sdpa"
    m = Gemma3ForCausalLM(cfg).eval()
    ids = prompt(20)
    ref = greedy(m, ids, 24, eos=[])
    out = generate(m, ids, drafter="token_recycling", max_new_tokens=24, tree=12, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    with pytest.raises(UnsupportedModelError, match="sliding_window - 1 = 127"):
        generate(m, ids, drafter="token_recycling", max_new_tokens=100, eos_token_id=[])


class Recorder(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_the_prompt_then_every_committed_token():
    m = llama("sdpa")
    ids = prompt()
    rec = Recorder()
    out = generate(m, ids, drafter="token_recycling", max_new_tokens=20, eos_token_id=[], streamer=rec)
    assert rec.chunks[0] == ids[0].tolist() and rec.ended
    assert [t for chunk in rec.chunks[1:] for t in chunk] == out.sequences[0, ids.shape[1] :].tolist()
    assert len(rec.chunks) - 1 == out.stats.forwards  # one chunk per verify step


def test_hot_start_persists_and_reset_gives_a_cold_start():
    m = llama("sdpa")
    ids = prompt(seed=7)
    d = TokenRecycling()
    cold = generate(m, ids, drafter=d, max_new_tokens=30, tree="official", eos_token_id=[])
    written = int((d.matrix >= 0).all(1).sum())
    assert written > 0
    generate(m, ids, drafter=d, max_new_tokens=30, tree="official", eos_token_id=[])
    assert int((d.matrix >= 0).all(1).sum()) >= written  # kept across calls
    d.reset()
    again = generate(m, ids, drafter=d, max_new_tokens=30, tree="official", eos_token_id=[])
    assert again.stats.forwards == cold.stats.forwards and again.stats.nodes == cold.stats.nodes


def test_accepted_tokens_by_source_add_up():
    m = llama("sdpa")
    ids = prompt(seed=9)
    out = generate(
        m, ids, drafter="rasd", max_new_tokens=33, tree="official", eos_token_id=[], draft_layers=2
    )
    s = out.stats
    assert set(s.accepted) == {"draft", "retrieval", "both"}
    # every step commits its accepted drafts and one bonus token; only the last step may be cut short
    assert s.new_tokens <= sum(s.accepted.values()) + s.forwards
    assert s.new_tokens > sum(s.accepted.values()) + s.forwards - 1 - 24


# ------------------------------------------------------------------ errors
def test_clear_errors():
    m = llama("sdpa")
    ids = prompt()
    with pytest.raises(ValueError, match="batch 1"):
        generate(m, ids.repeat(2, 1), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"unknown drafter 'medusa'.*token_recycling"):
        generate(m, ids, drafter="medusa", max_new_tokens=4)
    with pytest.raises(ValueError, match="tree must be 'auto', 'official' or an int >= 0"):
        generate(m, ids, tree="big", max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1; got 0"):
        generate(m, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"options \['k'\] need a drafter"):
        generate(m, ids, drafter=None, max_new_tokens=4, k=4)
    with pytest.raises(ValueError, match=r"draft_layers must be an int in \[1, 4\]"):
        generate(m, ids, drafter="rasd", max_new_tokens=4, draft_layers=9)
    fa = llama("sdpa")
    fa.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="custom 4-D attention mask"):
        generate(fa, ids, max_new_tokens=4)
    with pytest.raises(ValueError, match="ranks in"):
        TokenRecycling(k=2, template=[(0,), (2,)])
    with pytest.raises(ValueError, match="prefix must be a path"):
        TreeTemplate([(0,), (1, 0)], k=2)


# ------------------------------------------------------------------ Token Recycling
def test_official_template():
    p = official_paths()
    assert len(p) == 80
    per_depth = np.bincount([len(x) for x in p])[1:]
    assert per_depth.tolist() == [8, 21, 25, 15, 8, 3]  # the spec's count per depth
    assert p[:8] == [(r,) for r in range(8)] and p[-1] == (0, 0, 0, 1, 0, 0)
    t = TreeTemplate.official()
    assert len(t) == 81 and all(t.parents[i] < i for i in range(1, 81))


def test_fill_matches_a_hand_worked_template():
    #   root=5 -> M[5] = [7, 9];  M[7] = [3, 4];  M[9] = [6, 8];  M[3] = [1, 2]
    #   paths: [0]=7, [1]=9, [0,0]=3, [0,1]=4, [1,0]=6, [0,0,1]=2
    M = torch.full((10, 2), -1, dtype=torch.int32)
    M[5], M[7], M[9], M[3] = (
        torch.tensor([7, 9]),
        torch.tensor([3, 4]),
        torch.tensor([6, 8]),
        torch.tensor([1, 2]),
    )
    t = TreeTemplate([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 1)], k=2)
    assert t.fill(M, 5).tolist() == [5, 7, 9, 3, 4, 6, 2]
    assert t.parents.tolist() == [0, 0, 0, 1, 1, 2, 3]
    # an unwritten row drafts nothing below it
    M[9] = -1
    assert t.fill(M, 5).tolist() == [5, 7, 9, 3, 4, -1, 2]
    d = TokenRecycling(k=2, template=t)
    d.matrix = M
    draft = d.draft([5])
    assert draft.ids.tolist() == [5, 7, 9, 3, 4, 2] and draft.parents.tolist() == [0, 0, 0, 1, 1, 3]


def test_faithful_starts_from_zeros_and_drafts_token_zero():
    m = llama("sdpa")
    d = TokenRecycling(faithful=True)
    d.start(m, prompt()[0], None)
    assert d.draft([5]).ids.tolist() == [5] + [0] * 80
    d = TokenRecycling()
    d.start(m, prompt()[0], None)
    assert d.draft([5]).ids.tolist() == [5]  # nothing written yet: the root alone


def test_update_writes_each_row_once_from_its_last_node():
    d = TokenRecycling(k=2, template=[(0,), (1,), (0, 0)])
    d.matrix = torch.full((6, 2), -1, dtype=torch.int32)
    draft = TreeDraft(torch.tensor([4, 2, 4, 1]), torch.tensor([0, 0, 0, 1]))
    d._step = torch.tensor([1, 2, 3])
    logits = torch.tensor([
        [0.0, 1.0, 5.0, 3.0, 0.0, 0.0],  # node 0 (token 4): top-2 = [2, 3]
        [9.0, 8.0, 0.0, 0.0, 0.0, 0.0],  # node 1 (token 2): [0, 1]
        [0.0, 0.0, 0.0, 0.0, 7.0, 6.0],  # node 2 (token 4 again, the last): [4, 5]
        [0.0, 0.0, 0.0, 2.0, 3.0, 0.0],  # node 3 (token 1): [4, 3]
    ])  # fmt: skip
    v = Verified(tokens=[2, 0], path=[0, 1], logits=logits)
    d.update(draft, v)
    assert d.stats.steps == 0  # the engine counts full-tree steps only, through observe()
    d.observe(draft, v)
    assert (
        d.matrix[4].tolist() == [4, 5] and d.matrix[2].tolist() == [0, 1] and d.matrix[1].tolist() == [4, 3]
    )
    assert d.matrix[0].tolist() == [-1, -1]
    assert d.stats.steps == 1 and d.stats.hits.tolist() == [1, 0, 0] and list(d.stats.sizes) == [3]


def test_pruned_template_keeps_the_most_accepted_nodes_as_a_tree():
    t = TreeTemplate([(0,), (1,), (0, 0), (0, 1), (1, 0)], k=2)
    #            root  [0]  [1]  [0,0] [0,1] [1,0]
    rates = np.array([1.0, 0.6, 0.2, 0.5, 0.05, 0.3])
    assert closed_rates(rates, t.parents.numpy()).tolist() == [
        1.0,
        0.6,
        0.2,
        0.5,
        0.05,
        0.2,
    ]  # [1,0] capped by [1]
    d = TokenRecycling(k=2, template=t)
    for accepted in [[0, 2]] * 5 + [[0]] + [[1, 4]] * 2 + [[4]] + [[]]:  # 10 steps, hits [6, 2, 5, 0, 3]
        d.stats.observe(5, accepted)
    d.stats.hits[3] = 0.5  # [0,1]: half a hit, to give it 0.05
    d.set_budget(3)  # [0] (0.6), [0,0] (0.5), then [1] and [1,0] tie at 0.2 -> the shallower [1]
    assert d.active.paths == [(0,), (1,), (0, 0)]
    assert np.allclose(d.gains(), [0.6, 0.5, 0.2, 0.2, 0.05])


# ------------------------------------------------------------------ retrieval, pruning, fusion
def test_prompt_lookup_tree_by_hand():
    #  context: 5 6 7 9 4 | 5 6 7 8 1 | 5 6 7   -> the 3-gram "5 6 7" occurred at 0 and 5
    ctx = torch.tensor([5, 6, 7, 9, 4, 5, 6, 7, 8, 1, 5, 6, 7])
    tree, count = prompt_lookup_tree(ctx, max_ngram=3, max_len=3)
    assert paths(tree) == {(7,), (7, 8), (7, 8, 1), (7, 8, 1, 5), (7, 9), (7, 9, 4), (7, 9, 4, 5)}
    assert tree.source.tolist() == [BOTH] + [RETRIEVAL] * 6
    assert count[0] == 2 and torch.all(count[1:] == 1)
    # a shared continuation is one branch counted twice; the longest suffix wins over shorter ones
    tree, count = prompt_lookup_tree(torch.tensor([3, 4, 5, 9, 4, 5, 3, 4, 5]), max_ngram=2, max_len=2)
    assert paths(tree) == {(5,), (5, 3), (5, 3, 4), (5, 9), (5, 9, 4)}
    tree, _ = prompt_lookup_tree(torch.tensor([1, 2, 3]), max_len=2)
    assert len(tree) == 1  # no match: the root alone


def test_prune_by_draft_keeps_branches_the_draft_believes():
    tree = TreeDraft(torch.tensor([0, 7, 9, 8, 4]), torch.tensor([0, 0, 0, 1, 2]))  # 0 -> 7 -> 8, 0 -> 9 -> 4
    count = torch.tensor([3.0, 2.0, 1.0, 2.0, 1.0])
    probs = torch.zeros(12)
    probs[7], probs[9], probs[3] = 0.2, 0.005, 0.5
    kept, prio = prune_by_draft(tree, count, probs, top_k=2, p_min=0.01, max_nodes=8)
    assert paths(kept) == {(0,), (0, 7), (0, 7, 8)}  # 9 is neither in the top 2 (3, 7) nor >= p_min
    assert prio[1:].tolist() == pytest.approx([0.4, 0.4])  # count x p(first token)
    kept, _ = prune_by_draft(tree, count, probs, top_k=2, p_min=0.001, max_nodes=3)
    assert paths(kept) == {(0,), (0, 7), (0, 7, 8), (0, 9)}  # the cap drops the lowest-priority node


def _tree(spec: list[tuple[int, int]], root: int = 0) -> TreeDraft:
    return TreeDraft(torch.tensor([root] + [t for t, _ in spec]), torch.tensor([0] + [p for _, p in spec]))


def test_fusion_by_longest_prefix():
    a = _tree([(1, 0), (2, 0), (3, 1), (4, 3)])  # 0-1-3-4, 0-2
    b = _tree([(1, 0), (3, 1), (5, 2), (6, 1)])  # 0-1-3-5, 0-1-6
    f = fuse(a, b)
    assert paths(f) == paths(a) | paths(b)
    assert len(f) == len(paths(a) | paths(b))  # shared prefixes are verified once
    by_path, memo = {}, {0: (0,)}
    for i in range(1, len(f)):
        memo[i] = (*memo[int(f.parents[i])], int(f.ids[i]))
        by_path[memo[i]] = int(f.source[i])
    assert by_path[(0, 1)] == BOTH and by_path[(0, 1, 3)] == BOTH
    assert by_path[(0, 2)] == DRAFT and by_path[(0, 1, 3, 4)] == DRAFT
    assert by_path[(0, 1, 3, 5)] == RETRIEVAL and by_path[(0, 1, 6)] == RETRIEVAL


@pytest.mark.parametrize("seed", range(5))
def test_fusion_properties_on_random_trees(seed):
    g = torch.Generator().manual_seed(seed)

    def random_tree(n):
        parents = [0] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        return TreeDraft(
            torch.cat([torch.tensor([0]), torch.randint(1, 4, (n - 1,), generator=g)]), torch.tensor(parents)
        )

    a, b = random_tree(12), random_tree(9)
    assert paths(fuse(a, a)) == paths(a)  # idempotent
    f = fuse(a, b)
    assert paths(f) == paths(a) | paths(b)  # every path of both inputs survives without a cut
    assert len(f) <= len(a) + len(b) - 1
    for budget in (0, 3, 7):
        cut = fuse(a, b, budget)
        assert len(cut) - 1 <= budget
        assert paths(cut) <= paths(f)
        depth = cut.depths()
        assert bool((depth[1:] >= depth[:-1]).all())  # breadth-first: shallow nodes go first


# ------------------------------------------------------------------ the draft model and its tree
def test_truncated_shares_weights_and_equals_a_manual_forward():
    m = llama("sdpa")
    d = truncated(m, 2)
    assert len(m.model.layers) == 4 and m.config.num_hidden_layers == 4  # the target is untouched
    assert d.model.embed_tokens.weight is m.model.embed_tokens.weight and d.lm_head is m.lm_head
    ids = prompt()
    with torch.no_grad():
        h = m.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        rope = m.model.rotary_emb(h, pos)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        for layer in m.model.layers[:2]:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
        ref = m.lm_head(m.model.norm(h))
        assert torch.allclose(d(ids).logits, ref, atol=1e-5)


def test_draft_tree_scores_equal_sequential_draft_forwards():
    m = llama("eager")
    draft = truncated(m, 2)
    ids = prompt()[0]
    t = DraftModelTree(draft, depth=3, top_k=3, expand=2, nodes=10)
    t.start(ids)
    tok, parents, scores = t.grow()
    assert len(tok) == 10 and bool((parents < torch.arange(1, 11)).all())
    full_ids = torch.cat([ids[-1:], tok])
    full_par = torch.cat([torch.tensor([0]), parents])
    tree = TreeDraft(full_ids, full_par)
    anc = tree.ancestors()
    with torch.no_grad():
        for i in range(1, len(tree)):
            path = anc[i].nonzero().flatten()  # root .. node i
            seq = torch.cat([ids[:-1], full_ids[path]])
            logp = draft(seq[None]).logits[0].log_softmax(-1)
            positions = torch.arange(len(ids) - 1, len(seq) - 1)  # the logits that predict each path token
            want = logp[positions, seq[len(ids) :]].sum()  # the cumulative log-prob of the path
            assert float(scores[i - 1]) == pytest.approx(float(want), abs=1e-4)
    assert t.cache.get_seq_length() == len(ids)  # the tree was dropped from the draft cache


# ------------------------------------------------------------------ the budget
def test_fit_budget_by_hand():
    costs = ForwardCosts((1, 2, 3, 4), (1.0, 1.2, 1.5, 3.0))
    gains = [0.9, 0.5, 0.1]
    # tokens/second: n=0: 1/1; n=1: 1.9/1.2 = 1.58; n=2: 2.4/1.5 = 1.6; n=3: 2.5/3 = 0.83
    assert fit_budget(gains, costs) == 2
    assert fit_budget(gains, costs, draft_seconds=2.0) == 0  # drafting costs more than it saves
    assert fit_budget([], costs) == 0
    # trees that often have fewer nodes cost less: half the steps had 1 node, half 3
    # n=3: 2.5 tokens / mean(c(2), c(4)) = 2.5 / 2.1 = 1.19 (vs 0.83 when every step verifies 3)
    # n=2: 2.4 / mean(c(2), c(3)) = 2.4 / 1.35 = 1.78;  n=1: 1.9 / 1.2 = 1.58
    assert fit_budget(gains, costs, sizes=[1, 3]) == 2
    # 7 steps in 8 had 1 node: n=3: 2.85 / ((7 * 1.2 + 3.0) / 8) = 2.0 beats n=2: 2.4 / 1.2375 = 1.94
    assert fit_budget([0.9, 0.5, 0.45], costs, sizes=[1] * 7 + [3]) == 3
    assert fit_budget([0.9, 0.5, 0.45], costs, sizes=[1] * 3 + [3]) == 2  # 2.4 / 1.275 beats 2.85 / 1.65


def test_forward_costs_interpolate_and_extrapolate():
    c = ForwardCosts((1, 5, 9), (1.0, 2.0, 4.0))
    assert c(3) == pytest.approx(1.5) and c(7) == pytest.approx(3.0) and c(11) == pytest.approx(5.0)
    assert c.ratio(9) == pytest.approx(4.0)


def test_rasd_options_are_checked():
    with pytest.raises(ValueError, match="needs a draft model, retrieval, or both"):
        RASD(draft_model=False, retrieval=False)
    with pytest.raises(ValueError, match="nodes must be an int >= 1"):
        RASD(nodes=0)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        RASD(top_k=0)


def test_acceptance_counts_age_out_of_their_window():
    from prunekit.speculative import AcceptanceStats

    s = AcceptanceStats(3, window=2)
    s.observe(3, [0, 1])
    s.observe(1, [0])
    assert s.rates().tolist() == [1.0, 0.5, 0.0] and list(s.sizes) == [3, 1]
    s.observe(0, [])  # the first step leaves the window
    assert s.rates().tolist() == [0.5, 0.0, 0.0] and list(s.sizes) == [1, 0] and s.steps == 3
