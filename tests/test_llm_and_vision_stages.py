"""Stages (a) vision and (b) llm on every decoder and VLM family: exactness against an
independent masked reference, restoration, keep-everything identity, batching, errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import prunekit
from invariants import assert_same, snapshot
from prunekit.errors import SignalUnavailableError, UnknownMethodError, UnsupportedModelError
from prunekit.models.sequence import left_pack
from reference import decoder_layers, greedy, masked_reference, masked_reference_cuts
from test_atp_llava import module as atp_module
from tiny import DECODERS, VLMS, reset, text_inputs, vlm_inputs

TOL = 1e-4
# (family, method, stage, options): every method x every compatible family
VLM_CASES = [
    (fam, meth, "vision", {})
    for fam in VLMS
    for meth in ("fastervlm", "divprune", "random")
    if not (meth == "fastervlm" and fam.startswith("qwen"))
] + [(fam, "fastv", "llm", {"layer": 2}) for fam in VLMS]
# issue 5's vision-stage methods, on the families that give their signals (tiny CLIP: 3 layers, 4x4)
VLM_CASES += [
    (fam, meth, "vision", opts)
    for meth, fams, opts in [
        ("hiprune", ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"), {"object_layer": 1, "alpha": 1.0}),
        ("fopru", ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"), {}),
        ("fopru", ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"), {"strategy": "row"}),
        ("holov", ("llava", "qwen2_vl", "qwen2_5_vl"), {"num_crops": 4}),  # Qwen: received attention
        ("holov", ("llava", "llava_next"), {"crops": "1d", "num_crops": 4}),
        ("todre", tuple(VLMS), {}),
        ("safewatch", tuple(VLMS), {}),
        ("catp", tuple(VLMS), {}),
        ("lvlm_csp", tuple(VLMS), {"n_clusters": 4}),
        ("vflowopt", ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"), {"recycle": False}),
        ("hiprune+divprune", ("llava", "llava_next"), {"object_layer": 1}),  # compositions: score x select
        ("fastervlm+holov", ("llava",), {"num_crops": 4}),
        ("fastervlm+holov", ("llava_next",), {"crops": "1d", "num_crops": 4}),
    ]
    for fam in fams
]
TEXT_CASES = [(fam, "fastv", "llm", {"layer": 2}) for fam in DECODERS] + [
    (fam, "random", "llm", {"layer": 1}) for fam in DECODERS
]
# stage 2 of two-stage methods: instruction attention at an LLM layer, on VLMs and plain decoders
TEXT_CASES += [
    (fam, m, "llm", {"layer": 2}) for fam in (*VLMS, *DECODERS) for m in ("todre", "catp", "flowcut")
]
# progressive methods: several cuts inside the LLM (tiny decoders: 4 layers -> cuts at 1, 2, 3)
PROGRESSIVE_CASES = [
    (fam, meth, "llm", {"recycle": False} if meth == "sparsevlm" else {})  # merged values: not masking
    for fam in (*VLMS, *DECODERS)
    for meth in ("pyramiddrop", "transprune", "sparsevlm")
]

# ATP-LLaVA: instance-adaptive counts from a module with fixed thresholds (tests/test_atp_llava.py)
ATP_CASES = [(fam, "atp_llava", "llm", {"weights": atp_module(0.45, 0.9)}) for fam in VLMS]


def build(fam: str, attn: str):
    return (VLMS.get(fam) or DECODERS[fam])(attn)


def inputs_for(fam: str, model, batch: int) -> dict:
    return vlm_inputs(fam, model, batch) if fam in VLMS else text_inputs(batch)


def cut_layer(stage: str, options: dict) -> int:
    return 0 if stage == "vision" else options.get("layer", 2)


@pytest.mark.parametrize(("fam", "method", "stage", "options"), VLM_CASES + TEXT_CASES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_equals_masked_reference(fam, method, stage, options, attn):
    """Pruned generate() (batch of 2, left padding) == full-length generate() hiding dropped keys."""
    model = build(fam, attn)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    inp = inputs_for(fam, model, batch=2)
    reset(model)
    with torch.no_grad(), prunekit.prune_tokens(model, method, keep=0.4, stage=stage, **options) as session:
        tokens, logits = greedy(model, inp)
    assert len(session.stats.kept_masks) == 1, "one pruning per generate (prefill only)"
    kept = session.stats.kept_masks[0]
    assert 0.0 < session.stats.kept_fraction < 0.6
    reset(ref_model)
    with torch.no_grad(), masked_reference(ref_model, kept, cut_layer(stage, options), inp["attention_mask"]):
        ref_tokens, ref_logits = greedy(ref_model, inp)
    finite = torch.isfinite(ref_logits)  # generate's processors may set some logits to -inf
    assert torch.equal(finite, torch.isfinite(logits))
    err = (logits - ref_logits)[finite].abs().max().item()
    assert err < TOL, f"max |logit - reference| = {err:.2e} > {TOL}"
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize(("fam", "method", "stage", "options"), PROGRESSIVE_CASES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_progressive_generate_equals_masked_reference(fam, method, stage, options, attn):
    """Cuts at several layers == full-length generate() hiding, from each cut layer on, the keys
    dropped so far; the kept sets shrink and the mean per layer meets the budget."""
    model = build(fam, attn)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    inp = inputs_for(fam, model, batch=2)
    reset(model)
    with torch.no_grad(), prunekit.prune_tokens(model, method, keep=0.5, stage=stage, **options) as session:
        tokens, logits = greedy(model, inp)
    stats = session.stats
    n_layers = len(decoder_layers(model))
    assert stats.cut_layers == list(session.method.cuts(n_layers)) and len(stats.cut_layers) >= 2
    masks = stats.kept_masks
    for a, b in itertools.pairwise(masks):
        assert not bool((b & ~a).any()), "a later cut keeps a token an earlier one dropped"
        assert int(b.sum()) < int(a.sum())
    assert abs(stats.kept_fraction - 0.5) < 0.1, stats.kept_fraction
    reset(ref_model)
    with (
        torch.no_grad(),
        masked_reference_cuts(
            ref_model, list(zip(stats.cut_layers, masks, strict=True)), inp["attention_mask"]
        ),
    ):
        ref_tokens, ref_logits = greedy(ref_model, inp)
    finite = torch.isfinite(ref_logits)
    assert torch.equal(finite, torch.isfinite(logits))
    err = (logits - ref_logits)[finite].abs().max().item()
    assert err < TOL, f"max |logit - reference| = {err:.2e} > {TOL}"
    assert torch.equal(tokens, ref_tokens)


# merging methods change token vectors, so the masked reference does not apply; they are checked
# by test_visionzip_feeds_dominant_tokens_and_merged_ones_in_their_slots
MERGE_CASES = [
    (fam, m, "vision", {}) for fam in ("llava", "llava_next") for m in ("visionzip", "recoverable")
]
MERGE_CASES += [
    (fam, "vflowopt", "vision", {"m": 2.0}) for fam in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
]


@pytest.mark.parametrize(
    ("fam", "method", "stage", "options"),
    VLM_CASES + TEXT_CASES + MERGE_CASES + PROGRESSIVE_CASES + ATP_CASES,
)
def test_keep_everything_is_dense_and_model_restored(fam, method, stage, options):
    model = build(fam, "sdpa")
    inp = inputs_for(fam, model, batch=2)
    with torch.no_grad():
        model(**inp)  # transformers installs its own output-recording hooks on the first call
    before = snapshot(model)
    reset(model)
    with torch.no_grad():
        dense = model(**inp).logits
        reset(model)
        with prunekit.prune_tokens(model, method, keep=1.0, stage=stage, **options):
            same = model(**inp).logits
        reset(model)
        with pytest.raises(RuntimeError, match="inside the block"):  # restoration also after an exception
            with prunekit.prune_tokens(model, method, keep=0.5, stage=stage, **options):
                model(**inp)
                raise RuntimeError("boom inside the block")
        reset(model)
        after = model(**inp).logits
    err = (dense - same).abs().max().item()
    assert err < 1e-5, f"keep=1.0 differs from dense by {err:.2e} (tolerance 1e-5)"
    assert torch.equal(dense, after), "outputs changed after the with-block"
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(
    ("fam", "method", "stage"), [("llama", "fastv", "llm"), ("llava", "divprune", "vision")]
)
def test_session_attention_mask_matches_the_logits(fam, method, stage):
    """The output sequence is shorter than the prompt: ``session.attention_mask`` has its shape,
    one 1 per kept real token (left-packed: the last column is the last prompt token)."""
    model = build(fam, "sdpa")
    inp = inputs_for(fam, model, batch=2)
    with torch.no_grad(), prunekit.prune_tokens(model, method, keep=0.5, stage=stage) as s:
        logits = model(**inp).logits
    m = s.attention_mask
    assert logits.shape[1] < inp["attention_mask"].shape[1] and m.shape == logits.shape[:2]
    assert m.sum(1).tolist() == s.stats.kept_masks[-1].sum(1).tolist()
    assert bool(m[:, -1].all())


def test_model_mode_restored_in_training_mode():
    model = build("llama", "sdpa").train()
    model(**text_inputs(1))
    before = snapshot(model)
    with prunekit.prune_tokens(model, "fastv", keep=0.5):
        model(**text_inputs(1))
    assert_same(before, snapshot(model))


# ---------------------------------------------------------------- hand-worked / independent selections
def eager_last_row(model, inp, layer):
    """Head-mean attention row of the last token at ``layer`` from HF's own eager attention."""
    with torch.no_grad():
        out = model(**inp, output_attentions=True)
    return out.attentions[layer].mean(1)[:, -1]  # (B, L)


@pytest.mark.parametrize("fam", ["llama", "qwen2", "llava", "qwen2_vl"])
def test_fastv_keeps_top_last_token_attention_of_layer_k_minus_1(fam):
    """FastV's kept set == top-k of HF's eager attention row of layer K-1 (independent computation)."""
    model = build(fam, "eager")
    inp = inputs_for(fam, model, batch=1)
    reset(model)
    row = eager_last_row(model, inp, layer=1)[0]
    ids = inp["input_ids"][0]
    img_tok = getattr(model.config, "image_token_id", None)
    cand = (ids == img_tok) if fam in VLMS else torch.ones_like(ids, dtype=torch.bool)
    if fam not in VLMS:
        cand[-1] = False
    pos = cand.nonzero().flatten()
    k = 5
    expected = set(pos[row[pos].topk(k).indices].tolist())
    reset(model)
    # protect=None: every prompt token a candidate, BOS included (the default protects it)
    with torch.no_grad(), prunekit.prune_tokens(model, "fastv", keep=k, layer=2, protect=None) as s:
        model(**inp)
    kept = s.stats.kept_masks[0][0]
    assert set(pos[kept[pos]].tolist()) == expected
    assert bool(kept[~cand].all()), "non-candidate tokens must all be kept"


@pytest.mark.parametrize("keep", [6, 0.4, 2])
def test_protected_tokens_are_kept_and_count_against_the_budget(keep):
    """``protect=``: the protected prompt tokens are all kept; the rest of the same budget goes to
    the top of HF's eager last-token row among the other candidates (independent computation).
    With a budget below the protected count, only the protected tokens stay."""
    model = build("llama", "eager")
    inp = text_inputs(1)
    ids = inp["input_ids"][0]  # 20 tokens: 19 candidates
    protect = [int(ids[3]), int(ids[11]), int(ids[12])]
    prot = torch.isin(ids, torch.tensor(protect))
    prot[-1] = False  # the last token is no candidate anyway
    row = eager_last_row(model, inp, layer=1)[0]
    cand = torch.ones_like(prot)
    cand[-1] = False
    k = keep if isinstance(keep, int) else round(keep * 19)  # 7.6 -> 8: no rounding tie
    others = (cand & ~prot).nonzero().flatten()
    top = others[row[others].topk(max(0, k - int(prot.sum()))).indices]
    expected = set(prot.nonzero().flatten().tolist()) | set(top.tolist())
    with torch.no_grad(), prunekit.prune_tokens(model, "fastv", keep=keep, layer=2, protect=protect) as s:
        model(**inp)
    kept = s.stats.kept_masks[0][0]
    assert set(cand.nonzero().flatten()[kept[cand]].tolist()) == expected
    assert len(expected) == max(k, int(prot.sum()))
    assert (s.stats.tokens_in, s.stats.tokens_kept) == (19, len(expected))


def test_protect_forms_and_errors():
    from prunekit.tokens.engine import protected_ids

    model = build("llama", "sdpa")  # tiny config: BOS 1, EOS 2, padding 0
    assert protected_ids(model, "special").tolist() == [0, 1, 2]

    class Tok:
        all_special_ids = (7, 5, 7)

    assert protected_ids(model, Tok()).tolist() == [5, 7]
    assert protected_ids(model, (9, 4)).tolist() == [4, 9] and protected_ids(model, None) is None
    for bad in ("specials", [1.5], [], 3):
        with pytest.raises(ValueError, match="protect"):
            protected_ids(model, bad)
    with pytest.raises(UnsupportedModelError, match="text-only decoder"):
        with prunekit.prune_tokens(build("llava", "sdpa"), "fastv", keep=0.5, protect=[1]):
            pass
    with pytest.raises(UnsupportedModelError, match="single-cut"):
        with prunekit.prune_tokens(model, "pyramiddrop", keep=0.5, protect=[1]):
            pass
    # the default: the config's special ids on a text-only decoder with a single cut, else nothing
    with prunekit.prune_tokens(model, "fastv", keep=0.5) as s:
        assert s.protect.tolist() == [0, 1, 2]
    for other, method in ((model, "pyramiddrop"), (build("llava", "sdpa"), "fastv")):
        with prunekit.prune_tokens(other, method, keep=0.5) as s:
            assert s.protect is None


@pytest.mark.parametrize("fam", ["llama", "qwen2_vl"])
def test_recomputed_last_token_row_matches_eager_attentions(fam):
    """The row recomputed from q/k (RoPE / M-RoPE, GQA, padding) == HF's eager attention weights."""
    from prunekit.models.attention import last_query_attention

    model = build(fam, "eager")
    inp = inputs_for(fam, model, batch=2)
    reset(model)
    ref = eager_last_row(model, inp, layer=1)
    captured = {}
    layers = model.model.language_model.layers if fam in VLMS else model.model.layers
    key_valid = inp["attention_mask"].bool()

    def grab(attn, args, kw):
        captured["row"] = last_query_attention(
            attn, kw["hidden_states"], kw["position_embeddings"], key_valid
        )

    h = layers[1].self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    reset(model)
    with torch.no_grad():
        model(**inp)
    h.remove()
    err = (captured["row"] - ref).abs().max().item()
    assert err < 1e-5, f"{fam}: recomputed row differs from eager by {err:.2e} (tolerance 1e-5)"


def test_recomputed_cls_row_matches_eager_clip_attentions():
    from prunekit.models.attention import cls_query_attention

    model = build("llava", "eager")
    tower = model.model.vision_tower
    pv = torch.randn(2, 3, 56, 56)
    layer = getattr(tower, "vision_model", tower).encoder.layers[1].self_attn
    captured = {}

    def grab(attn, args, kw):
        h = args[0] if args else kw["hidden_states"]
        captured["row"] = cls_query_attention(attn.q_proj, attn.k_proj, h, attn.num_heads, attn.scale)

    hd = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        out = tower(pv, output_attentions=True)
    hd.remove()
    ref = out.attentions[1].mean(1)[:, 0]  # (B, 1+N)
    err = (captured["row"] - ref).abs().max().item()
    assert err < 1e-5, f"CLS row differs from eager by {err:.2e} (tolerance 1e-5)"


def test_fastervlm_keeps_top_cls_attention_of_feature_layer():
    """LLaVA vision_feature_layer=-2 on a 3-layer CLIP -> attention of layer 1, CLS row, head mean."""
    model = build("llava", "eager")
    inp = vlm_inputs("llava", model, batch=1)
    with torch.no_grad():
        att = model.model.vision_tower(inp["pixel_values"], output_attentions=True).attentions
    score = att[1].mean(1)[0, 0, 1:]  # (N,) patch columns
    k = 6
    expected_rank = set(score.topk(k).indices.tolist())
    with torch.no_grad(), prunekit.prune_tokens(model, "fastervlm", keep=k) as s:
        model(**inp)
    kept = s.stats.kept_masks[0][0]
    img_pos = (inp["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    got = set((kept[img_pos]).nonzero().flatten().tolist())
    assert got == expected_rank


def test_two_vision_layers_reach_the_method_as_their_own_maps(monkeypatch):
    """HiPrune asks for the maps of two vision layers at once: each arrives under its own key and
    equals eager attention of that layer ([CLS] row and column dropped)."""
    from prunekit.tokens.methods.hiprune import HiPrune

    model = build("llava", "eager")
    inp = vlm_inputs("llava", model, batch=1)
    with torch.no_grad():
        att = model.model.vision_tower(inp["pixel_values"], output_attentions=True).attentions
    seen = {}
    original = HiPrune.select

    def spy(self, ctx, k):
        seen["obj"], seen["deep"] = ctx.signal("attention_map", 0), ctx.signal("attention_map")
        return original(self, ctx, k)

    monkeypatch.setattr(HiPrune, "select", spy)
    with torch.no_grad(), prunekit.prune_tokens(model, "hiprune", keep=6, object_layer=1, alpha=1.0):
        model(**inp)
    assert (seen["obj"] - att[0][:, :, 1:, 1:]).abs().max() < 1e-5  # object layer 1 (1-based) = layer 0
    assert (seen["deep"] - att[1][:, :, 1:, 1:]).abs().max() < 1e-5  # feature layer -2 of 3 = layer 1
    with pytest.raises(ValueError, match="out of range"):
        with prunekit.prune_tokens(model, "hiprune", keep=6, object_layer=9):
            pass


def test_visionzip_feeds_dominant_tokens_and_merged_ones_in_their_slots():
    model = build("llava", "eager")
    inp = vlm_inputs("llava", model, batch=1)
    with torch.no_grad():
        att = model.model.vision_tower(inp["pixel_values"], output_attentions=True).attentions
        feats = model.model.get_image_features(pixel_values=inp["pixel_values"], return_dict=True)
        feats = feats.pooler_output[0]  # (16, D) projected visual tokens
    captured = {}

    def grab(module, args, kw):
        captured["x"] = kw["inputs_embeds"]

    with torch.no_grad(), prunekit.prune_tokens(model, "visionzip", keep=8, dominant_ratio=0.75):
        # registered after the adapter's pre-hook, so it sees the pruned inputs
        hd = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**inp)
        finally:
            hd.remove()
    x = captured["x"][0]
    n_text = int((inp["input_ids"][0] != model.config.image_token_id).sum())
    assert x.shape[0] == n_text + 8
    dominant = set(att[1].mean(1)[0, 0, 1:].topk(6).indices.tolist())  # round(8 * 0.75) = 6
    # the 8 visual slots: 6 untouched originals (exactly the dominant tokens), 2 merged vectors
    start = int((inp["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    vis = x[start : start + 8]
    dist = (vis[:, None, :] - feats[None]).abs().amax(-1)  # (8, 16)
    is_orig = dist.amin(-1) < 1e-6
    assert int(is_orig.sum()) == 6
    assert set(dist[is_orig].argmin(-1).tolist()) == dominant


def test_llava_next_newline_tokens_always_kept_and_budget_per_image():
    model = build("llava_next", "sdpa")
    inp = vlm_inputs("llava_next", model, batch=2)
    with torch.no_grad(), prunekit.prune_tokens(model, "fastervlm", keep=5) as s:
        model(**inp)
    kept = s.stats.kept_masks[0]
    img = inp["input_ids"] == model.config.image_token_id
    n_img = img.sum(1)
    kept_img = (kept & img).sum(1)
    # 5 candidates + the newline tokens of each image survive; newline count < total image tokens
    assert bool((kept_img > 5).all()) and bool((kept_img < n_img).all())


# ---------------------------------------------------------------- errors
def test_clear_errors():
    llama = build("llama", "sdpa")
    with pytest.raises(UnknownMethodError, match="fastv"):
        with prunekit.prune_tokens(llama, "fastvv", keep=0.5):
            pass
    for bad in (0, -3, 0.0, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"keep"):
            with prunekit.prune_tokens(llama, "fastv", keep=bad):
                pass
    with pytest.raises(UnsupportedModelError, match="supported families"):
        with prunekit.prune_tokens(torch.nn.Linear(2, 2), "fastv", keep=0.5):
            pass
    with pytest.raises(UnsupportedModelError, match="stage"):  # FasterVLM needs visual tokens
        with prunekit.prune_tokens(llama, "fastervlm", keep=0.5):
            pass
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        with prunekit.prune_tokens(llama, "fastv", keep=0.5, layer=4):
            pass
    with pytest.raises(ValueError, match="allowed"):
        with prunekit.prune_tokens(llama, "fastv", keep=0.5, K=2):
            pass
    qwen = build("qwen2_vl", "sdpa")
    before = snapshot(qwen)
    with pytest.raises(SignalUnavailableError, match=r"no \[CLS\]"):
        with prunekit.prune_tokens(qwen, "fastervlm", keep=0.5):
            pass
    assert_same(before, snapshot(qwen))  # a refused attach leaves nothing behind


def test_right_padding_is_refused():
    model = build("llama", "sdpa")
    ids = torch.randint(3, 200, (2, 10))
    am = torch.ones_like(ids)
    am[1, -3:] = 0
    with pytest.raises(prunekit.errors.PrunekitError, match="left padding"):
        with torch.no_grad(), prunekit.prune_tokens(model, "fastv", keep=0.5):
            model(input_ids=ids, attention_mask=am)


def test_signal_the_adapter_cannot_give_is_refused_before_any_forward():
    from dataclasses import dataclass

    from prunekit.tokens.context import Signal
    from prunekit.tokens.methods.fastv import FastV

    @dataclass
    class NeedsFullMap(FastV):  # asks for a [CLS] row: a decoder has no [CLS] token
        def needs(self, stage):
            return (Signal("cls_attention", 1),)

    NeedsFullMap.name = "fastv"
    model = build("llama", "sdpa")
    before = snapshot(model)
    with pytest.raises(SignalUnavailableError, match=r"cls_attention.*gives: tokens, last_token_attention"):
        with prunekit.prune_tokens(model, NeedsFullMap(), keep=0.5):
            pass
    assert_same(before, snapshot(model))


def test_unsupported_hf_family_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*supported families"):
        with prunekit.prune_tokens(gpt2, "fastv", keep=0.5):
            pass


def test_support_matrix_says_exactly_where_methods_attach():
    """`prunekit methods --matrix` is read from declarations; here each cell is checked by attaching."""
    from prunekit.errors import PrunekitError
    from prunekit.models import support_matrix

    options = {"hiprune": {"object_layer": 1}}  # the tiny towers have 3 layers
    matrix = support_matrix()
    for fam in [*VLMS, "llama"]:
        model = build(fam, "sdpa")
        family = "decoder (Llama/Qwen2/Mistral)" if fam == "llama" else fam
        for method, row in matrix.items():
            stage, why = row[family]
            try:
                with prunekit.prune_tokens(model, method, keep=0.5, **options.get(method, {})) as s:
                    attached = s.stage
            except (SignalUnavailableError, UnsupportedModelError) as e:
                attached, err = None, e
            except PrunekitError as e:  # any other refusal must not be a support question
                raise AssertionError(f"{method} on {fam}: {e}") from e
            assert attached == stage, f"{method} on {fam}: matrix {stage!r} ({why}), attach {attached!r}"
            if attached is None:
                assert str(err)


@pytest.mark.parametrize("fam", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("method", ["todre", "catp"])
def test_two_stages_nested_equal_the_masked_reference(fam, method):
    """Stage 1 at the vision stage (outer session) + stage 2 at LLM layer 2 (inner session): the
    LLM cut sees the vision stage's survivors; == hiding vision-dropped keys from layer 0 and the
    LLM-dropped ones from layer 2."""
    model = build(fam, "sdpa")
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    inp = inputs_for(fam, model, batch=2)
    reset(model)
    with (
        torch.no_grad(),
        prunekit.prune_tokens(model, method, keep=0.6) as vision,
        prunekit.prune_tokens(model, method, keep=0.5, stage="llm", layer=2) as llm,
    ):
        tokens, logits = greedy(model, inp)
    v_kept, l_kept = vision.stats.kept_masks[0], llm.stats.kept_masks[0]
    assert l_kept.shape[1] < v_kept.shape[1], "the LLM cut ran on the vision stage's output"
    kidx, ok = left_pack(v_kept)
    both = torch.zeros_like(v_kept).scatter_(1, kidx, l_kept & ok)  # LLM survivors, prompt coordinates
    assert not bool((both & ~v_kept).any())
    n_img = int(v_kept.sum() - both.sum())
    assert n_img > 0, "stage 2 dropped nothing"
    reset(ref_model)
    with torch.no_grad(), masked_reference_cuts(ref_model, [(0, v_kept), (2, both)], inp["attention_mask"]):
        ref_tokens, ref_logits = greedy(ref_model, inp)
    finite = torch.isfinite(ref_logits)
    err = (logits - ref_logits)[finite].abs().max().item()
    assert err < TOL, f"max |logit - reference| = {err:.2e} > {TOL}"
    assert torch.equal(tokens, ref_tokens)
    assert not hasattr(model, "_prunekit_vision_index") and not hasattr(model, "_prunekit_llm_cut")


def test_vision_session_inside_an_llm_session_is_refused():
    model = build("llava", "sdpa")
    with prunekit.prune_tokens(model, "fastv", keep=0.5):
        with pytest.raises(prunekit.PrunekitError, match="open the vision-stage prune_tokens first"):
            with prunekit.prune_tokens(model, "divprune", keep=0.5):
                pass
    assert not hasattr(model, "_prunekit_llm_cut")
