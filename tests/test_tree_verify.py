"""Draft-tree verification in one forward: every node's logits equal a sequential forward of its
root-to-node path (eager and SDPA), greedy acceptance on hand-worked trees, decoding with
verify + compaction equals greedy ``generate()`` token for token, and clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from prunekit.errors import UnsupportedModelError
from prunekit.speculative import TreeDraft, accept, verify
from prunekit.speculative.tree import check_model


def model(attn: str = "eager", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=1, bos_token_id=0, pad_token_id=2)  # fmt: skip
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def _prefill(m, prompt: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(input_ids=prompt[None, :-1], past_key_values=cache, use_cache=True)
    return cache


def test_depths_and_ancestors_by_hand():
    #        0
    #      /   \
    #     1     2
    #    / \
    #   3   4
    #   |
    #   5
    d = TreeDraft(torch.tensor([7, 8, 9, 10, 11, 12]), torch.tensor([0, 0, 0, 1, 1, 3]))
    assert d.depths().tolist() == [0, 1, 1, 2, 2, 3]
    anc = d.ancestors()
    assert anc[5].nonzero().flatten().tolist() == [0, 1, 3, 5]
    assert anc[2].nonzero().flatten().tolist() == [0, 2]


def test_greedy_acceptance_by_hand():
    d = TreeDraft(torch.tensor([7, 8, 9, 10, 11, 12]), torch.tensor([0, 0, 0, 1, 1, 3]))
    pred = torch.tensor([8, 11, 0, 0, 5, 0])  # root predicts 8 (node 1), node 1 predicts 11 (node 4)
    assert accept(d, pred) == [0, 1, 4]
    assert accept(d, torch.tensor([9, 0, 0, 0, 0, 0])) == [0, 2]
    assert accept(d, torch.tensor([3, 0, 0, 0, 0, 0])) == [0]  # nothing accepted: the bonus token only


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_node_logits_equal_a_sequential_forward_of_its_path(attn):
    m = model(attn)
    prompt = torch.randint(3, 64, (9,), generator=torch.Generator().manual_seed(1))
    d = TreeDraft(torch.tensor([int(prompt[-1]), 5, 6, 7, 8, 9, 10]), torch.tensor([0, 0, 0, 1, 1, 3, 2]))
    cache = _prefill(m, prompt)
    past = cache.get_seq_length()
    res = verify(m, cache, d)
    anc = d.ancestors()
    for i in range(len(d)):
        path = d.ids[anc[i]]  # root first (ancestors come before descendants)
        seq = torch.cat([prompt[:-1], path])
        with torch.no_grad():
            ref = m(input_ids=seq[None]).logits[0, -1]
        torch.testing.assert_close(res.logits[i], ref, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == past + len(res.path)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_decoding_with_verify_and_compaction_equals_greedy_generate(attn):
    m = model(attn, seed=3)
    prompt = torch.randint(3, 64, (7,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # greedy, stopping at EOS if the model predicts it
        ones = torch.ones(1, 7, dtype=torch.long)
        ref = m.generate(prompt[None], attention_mask=ones, max_new_tokens=12, do_sample=False)[
            0, 7:
        ].tolist()
    n_new = len(ref)
    cache = _prefill(m, prompt)
    out, root, step = [], int(prompt[-1]), 0
    g = torch.Generator().manual_seed(4)
    while len(out) < n_new:
        # a tree with the true continuation (2 tokens, the second one wrong every other step) on one
        # branch and random distractors beside it
        k = len(out)
        true = ref[k : k + 2] + [0] * 2
        second = true[1] if step % 2 else (true[1] + 1) % 64
        ids = [root, int(torch.randint(3, 64, (1,), generator=g)), true[0], second, true[0]]
        d = TreeDraft(torch.tensor(ids), torch.tensor([0, 0, 0, 2, 1]))
        res = verify(m, cache, d)
        out += res.tokens
        root = res.tokens[-1]
        step += 1
        assert cache.get_seq_length() == 6 + len(out)  # the prompt minus its last token, plus the committed
    assert out[:n_new] == ref


def test_clear_errors():
    with pytest.raises(ValueError, match="parents"):
        TreeDraft(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 0]))
    with pytest.raises(ValueError, match="one length"):
        TreeDraft(torch.tensor([1, 2]), torch.tensor([0]))
    m = model()
    with pytest.raises(ValueError, match="batch 1"):
        check_model(m, torch.ones(2, 4, dtype=torch.long))
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="custom 4-D attention mask"):
        check_model(m, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(UnsupportedModelError, match="custom 4-D attention mask"):  # verify checks it first
        verify(m, DynamicCache(config=m.config), TreeDraft(torch.tensor([5, 6]), torch.tensor([0, 0])))
