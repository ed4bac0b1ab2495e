"""Structured pruning of encoders (heads and MLP channels of ViT, DeiT, DINOv2, CLIP, BERT): masked
model == physically shrunk model (eager and SDPA), save -> load_pruned, restore (also after an
exception), FLAP against an independent computation, padding left out of text statistics, and
clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

import prunekit
from prunekit.errors import UnsupportedModelError
from prunekit.models.structure import LayerKeep
from prunekit.weights.calibration import CalibrationError
from test_structured import Fixed  # a method that returns a given plan
from tiny_encoders import ENCODERS, build, build_clip

SIZE = {"vit": 32, "deit": 32, "dinov2": 28, "clip_vision": 28}
METHODS = ("flap", "wanda_sp", "magnitude_sp", "random_sp")


def inputs(name: str, n: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "bert":
        ids = torch.randint(3, 100, (n, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # one padded row
        return {"input_ids": ids, "attention_mask": mask}
    return {"pixel_values": torch.randn(n, 3, SIZE[name], SIZE[name], generator=g)}


def calib(name: str) -> torch.Tensor:
    x = inputs(name, n=6, seed=2)
    return x["input_ids"] if name == "bert" else x["pixel_values"]


def out(model, x) -> torch.Tensor:
    with torch.no_grad():
        o = model(**x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def layers_of(model):
    from prunekit.models.encoder_structure import encoder_stack

    return encoder_stack(model).layers


def hand_plan(H: int = 32, inter: int = 64) -> list[LayerKeep]:
    g = torch.Generator().manual_seed(3)
    return [
        LayerKeep(q_heads=torch.tensor([1, 3]), channels=torch.arange(0, inter, 2)),
        LayerKeep(channels=torch.tensor([5]), down_bias=torch.randn(H, generator=g)),
        LayerKeep(q_heads=torch.tensor([2]), o_bias=torch.randn(H, generator=g)),
        LayerKeep(),
    ]


# ------------------------------------------------------------------ masked == shrunk
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ENCODERS)
def test_shrunk_model_equals_masked_model(name, attn):
    model = build(name, attn=attn)
    x = inputs(name)
    dense = out(model, x)
    pruned = prunekit.prune_weights(model, Fixed(keeps=hand_plan()), 0.3, progress=False)
    masked = out(model, x)
    assert not torch.allclose(masked, dense, atol=1e-4)
    pruned.finalize()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    from prunekit.models.encoder_structure import FAMILIES, encoder_geometry, encoder_stack

    stack = encoder_stack(model)
    geos = [encoder_geometry(layer, stack.names) for layer in stack.layers]
    assert [(g.n_q, g.inter) for g in geos] == [(2, 32), (4, 1), (1, 64), (4, 64)]
    owner, attr = FAMILIES[stack.family][0].heads[0].rsplit(".", 1)  # the head count follows the weights
    assert [getattr(layer.get_submodule(owner), attr) for layer in stack.layers] == [2, 4, 1, 4]
    torch.testing.assert_close(out(model, x), masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["dinov2", "bert"])
def test_every_method_shrinks_to_the_masked_model(name, method):
    model = build(name)
    x = inputs(name)
    pruned = prunekit.prune_weights(model, method, 0.4, calibration=calib(name), progress=False)
    rep = pruned.report
    assert rep.params_pruned / rep.params_targeted == pytest.approx(0.4, abs=0.03)
    masked = out(model, x)
    pruned.finalize()
    torch.testing.assert_close(out(model, x), masked, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ save -> load_pruned
@pytest.mark.parametrize("name", ENCODERS)
def test_save_then_load_pruned_gives_identical_outputs(name, tmp_path):
    model = build(name)
    x = inputs(name)
    prunekit.prune_weights(model, "flap", 0.35, calibration=calib(name), progress=False).finalize()
    want = out(model, x)
    model.save_pretrained(tmp_path)
    again = prunekit.load_pruned(tmp_path)
    assert type(again) is type(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert torch.equal(out(again.eval(), x), want)


def test_clip_towers_pruned_inside_clip_model_reload(tmp_path):
    model = build_clip()
    pix = inputs("clip_vision")["pixel_values"]
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(4))
    with pytest.raises(UnsupportedModelError, match=r"model\.vision_model or model\.text_model"):
        prunekit.prune_weights(model, "magnitude_sp", 0.3, progress=False)
    prunekit.prune_weights(model.vision_model, "flap", 0.3, calibration=pix, progress=False).finalize()
    prunekit.prune_weights(model.text_model, "wanda_sp", 0.3, calibration=ids, progress=False).finalize()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pix).pooler_output
        txt = model.get_text_features(input_ids=ids).pooler_output
    model.save_pretrained(tmp_path)
    again = prunekit.load_pruned(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again.get_image_features(pixel_values=pix).pooler_output, img)
        assert torch.equal(again.get_text_features(input_ids=ids).pooler_output, txt)
    assert again.text_model.encoder.layers[0].self_attn.num_heads == 3


# ------------------------------------------------------------------ restore
@pytest.mark.parametrize("name", ["vit", "bert"])
def test_restore_gives_back_the_model_exactly(name):
    model = build(name)
    x = inputs(name)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    dense = out(model, x)
    with prunekit.prune_weights(model, "flap", 0.3, calibration=calib(name), progress=False) as pruned:
        assert pruned.masks and not torch.allclose(out(model, x), dense, atol=1e-4)
    assert pruned.state == "restored"
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    state = model.state_dict()
    assert state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)
    assert torch.equal(out(model, x), dense)


def test_a_failure_half_way_restores():
    plan = hand_plan()
    plan[2] = LayerKeep(q_heads=torch.tensor([], dtype=torch.long))  # layer 2 would lose every head
    model = build("dinov2")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 2: every head would go"):
        prunekit.prune_weights(model, Fixed(keeps=plan), 0.3, progress=False)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())


# ------------------------------------------------------------------ rankings
def test_flap_matches_an_independent_computation():
    """WIFV (squared for attention) of the dense model's o_proj / fc2 inputs with DINOv2's layer
    scale folded into the weights, standardised per layer, one global ranking with exact costs
    (head 4Hd, channel 2H) keeping each layer's best unit; compensation with the raw weights."""
    model = build("dinov2")
    g = torch.Generator().manual_seed(5)
    for layer in model.encoder.layer:  # per-channel layer scales, so folding them matters
        layer.layer_scale1.lambda1.data = torch.rand(32, generator=g) + 0.1
        layer.layer_scale2.lambda1.data = torch.rand(32, generator=g) + 0.1
    cal = calib("dinov2")
    X, handles = {}, []
    for i, layer in enumerate(model.encoder.layer):
        for key, lin in (("o", layer.attention.o_proj), ("fc2", layer.mlp.fc2)):
            hook = lambda m, a, o, k=(i, key): X.setdefault(k, []).append(a[0].reshape(-1, a[0].shape[-1]))  # noqa: E731
            handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        model(pixel_values=cal)
    for h in handles:
        h.remove()
    H, d, s = 32, 8, 0.45
    items = []
    for i, layer in enumerate(model.encoder.layer):
        Wo = (
            layer.attention.o_proj.weight.detach().double()
            * layer.layer_scale1.lambda1.detach().double()[:, None]
        )
        W2 = layer.mlp.fc2.weight.detach().double() * layer.layer_scale2.lambda1.detach().double()[:, None]
        xa, xm = torch.cat(X[(i, "o")]).double(), torch.cat(X[(i, "fc2")]).double()
        att = (xa.var(0) * (Wo**2).sum(0)) ** 2
        mlp = xm.var(0) * (W2**2).sum(0)
        za, zm = (att - att.mean()) / att.std(), (mlp - mlp.mean()) / mlp.std()
        heads = [float(za[h * d : (h + 1) * d].mean()) for h in range(4)]
        bh, bc = max(range(4), key=lambda h: heads[h]), int(zm.argmax())
        items += [(float("inf") if h == bh else heads[h], 4 * H * d, i, "h", h) for h in range(4)]
        items += [(float("inf") if j == bc else float(zm[j]), 2 * H, i, "c", j) for j in range(64)]
    total = sum(c for _, c, *_ in items)
    ranked = sorted(items, key=lambda t: -t[0])
    best, run, n_keep = None, 0, 0
    for n, (_, c, *_) in enumerate(ranked, 1):
        run += c
        if best is None or abs(run - (1 - s) * total) < best:
            best, n_keep = abs(run - (1 - s) * total), n
    kept = {(i, k, j) for _, _, i, k, j in ranked[:n_keep]}
    pruned = prunekit.prune_weights(model, "flap", s, calibration=cal, progress=False)
    assert any(len(r.q_heads) < 4 for r in pruned.report.layers)  # heads did go somewhere
    for i, layer in enumerate(model.encoder.layer):
        r, keep = pruned.report.layers[i], pruned.keeps[i]
        assert r.q_heads == [h for h in range(4) if (i, "h", h) in kept]
        chans = list(range(64)) if keep.channels is None else keep.channels.tolist()
        assert chans == [j for j in range(64) if (i, "c", j) in kept]
        xm = torch.cat(X[(i, "fc2")]).double().mean(0)
        gone = [j for j in range(64) if j not in chans]
        if gone:  # compensation with the raw fc2 (it is added before the layer scale)
            want = layer.mlp.fc2.parametrizations.weight.original.double()[:, gone] @ xm[gone]
            torch.testing.assert_close(keep.down_bias.double(), want, atol=1e-5, rtol=1e-5)


def test_magnitude_sp_keeps_the_largest_columns_uniformly():
    model = build("bert")
    norms = [
        (layer.attention.output.dense.weight.norm(dim=0), layer.output.dense.weight.norm(dim=0))
        for layer in model.encoder.layer
    ]
    pruned = prunekit.prune_weights(model, "magnitude_sp", 0.25, progress=False)
    for (att, mlp), r, keep in zip(norms, pruned.report.layers, pruned.keeps.values(), strict=True):
        head = att.reshape(4, 8).sum(-1)
        assert r.q_heads == sorted(head.argsort(descending=True)[:3].tolist())  # round(0.25 * 4) = 1 gone
        # the MLP loses what brings the layer nearest 25 % of its 8192 weights: (2048 - 1024) / 64 = 16
        assert keep.channels.tolist() == sorted(mlp.argsort(descending=True)[:48].tolist())


def test_padding_is_left_out_of_text_statistics():
    """Texts padded in batches give the same FLAP plan and biases as the same ids run one by one."""

    class Tok:
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            ids = [[3 + sum(map(ord, w)) % 90 for w in t.split()][:max_length] for t in texts]
            n = max(map(len, ids))
            return {
                "input_ids": torch.tensor([q + [0] * (n - len(q)) for q in ids]),
                "attention_mask": torch.tensor([[1] * len(q) + [0] * (n - len(q)) for q in ids]),
            }

    texts = ["a b c d e f g h", "one two", "x y z w", "the quick brown fox jumps"]
    ragged = [Tok()([t], True, True, 99, "pt")["input_ids"][0] for t in texts]
    plans = []
    for cal, tok in ((texts, Tok()), (ragged, None)):
        model = build("bert")
        pruned = prunekit.prune_weights(model, "flap", 0.3, calibration=cal, tokenizer=tok, batch_size=4,
                                        progress=False)  # fmt: skip
        assert pruned.report.calibration_tokens == sum(len(q) for q in ragged)
        plans.append(list(pruned.keeps.values()))
    for a, b in zip(*plans, strict=True):
        for f in ("q_heads", "channels"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or torch.equal(x, y)
        torch.testing.assert_close(a.down_bias, b.down_bias, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.2"])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prunekit.prune_weights(build("vit"), "magnitude_sp", bad, progress=False)


def test_a_sparsity_that_would_empty_a_layer_is_refused():
    model = build("deit")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="would empty a layer"):
        prunekit.prune_weights(model, "flap", 0.97, calibration=calib("deit"), progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())


@pytest.mark.parametrize(
    "name,cal,match",
    [
        ("dinov2", None, "pixel_values"),
        ("dinov2", torch.zeros(0, 3, 28, 28), "non-empty float tensor"),
        ("clip_vision", torch.zeros(2, 9, dtype=torch.long), "pixel_values"),
        ("bert", [], "empty"),
        ("bert", ["", " "], "empty"),
        ("bert", torch.zeros(0, 8, dtype=torch.long), "non-empty"),
    ],
)
def test_empty_or_wrong_calibration_is_refused(name, cal, match):
    with pytest.raises(CalibrationError, match=match):
        prunekit.prune_weights(build(name), "flap", 0.2, calibration=cal, tokenizer=object(), progress=False)


def test_methods_that_need_more_than_activations_are_refused():
    with pytest.raises(UnsupportedModelError, match=r"flap.*wanda_sp"):
        prunekit.prune_weights(build("bert"), "cfsp", 0.2, calibration=calib("bert"), progress=False)
    with pytest.raises(UnsupportedModelError, match="methods for vit"):
        prunekit.prune_weights(build("vit"), "shortgpt", 0.2, calibration=calib("vit"), progress=False)


def test_layouts_outside_the_groups_are_refused():
    with pytest.raises(UnsupportedModelError, match="SwiGLU"):
        prunekit.prune_weights(build("dinov2", use_swiglu_ffn=True), "magnitude_sp", 0.2, progress=False)
    cross = build("bert", is_decoder=True, add_cross_attention=True)
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        prunekit.prune_weights(cross, "magnitude_sp", 0.2, progress=False)
