"""LoRA recovery (prunekit.recover) on a tiny Llama pruned by FLAP and finalized: the training loss
falls, the merged model holds no PEFT module and keeps its shapes, biases, dtype and eval mode,
the same seed gives identical weights, save -> load_pruned reloads it, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import LlamaConfig, LlamaForCausalLM

import prunekit
from prunekit.errors import PrunekitError, UnsupportedModelError
from prunekit.models.structure import LayerKeep, NoAttention, shrink_layer
from prunekit.training import lora_targets
from tiny import TXT

CAL = torch.randint(3, 256, (6, 24), generator=torch.Generator().manual_seed(1))
# A learnable corpus: a fixed random 16-token phrase repeated, cut into windows of 32.
PHRASE = torch.randint(3, 256, (16,), generator=torch.Generator().manual_seed(2))
DATA = PHRASE.repeat(24).view(12, 32)
FAST = dict(steps=12, lr=1e-2, batch_size=4, progress=False)


def pruned() -> LlamaForCausalLM:
    """Tiny GQA Llama (8 query / 2 KV heads), FLAP at 0.3, finalized (per-layer widths differ)."""
    torch.manual_seed(0)
    cfg = dict(TXT, num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_hidden_layers=3)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).eval()
    prunekit.prune_weights(model, "flap", 0.3, calibration=CAL).finalize()
    return model


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return pruned()


def lm_loss(model, ids) -> float:
    """Mean next-token cross-entropy, computed here from the logits."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return float(
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    )


def test_recover_lowers_loss_and_merges_cleanly(base):
    model = copy.deepcopy(base)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    biases = {n: t.clone() for n, t in model.state_dict().items() if n.endswith(".bias")}
    assert any(".o_proj.bias" in n or ".down_proj.bias" in n for n in biases)  # FLAP's compensation
    before = lm_loss(model, DATA)
    report = prunekit.recover(model, DATA, **FAST)
    after = lm_loss(model, DATA)
    print(f"loss on its own texts: {before:.3f} -> {after:.3f}; report {report}")
    assert after < before - 0.5
    assert report.steps == 12 and len(report.losses) == 12 and report.loss_last < report.loss_first
    assert len(report.modules) == 3 * 7 and report.trainable_params > 0
    # No PEFT module, attribute or parameter left; same tensors, same shapes; biases untouched.
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert "peft_config" not in model.__dict__
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == shapes
    for n, b in biases.items():
        assert torch.equal(model.state_dict()[n], b), n
    changed = [n for n, t in model.state_dict().items() if not torch.equal(t, base.state_dict()[n])]
    assert changed and all(n.endswith(".weight") and n.rsplit(".", 2)[-2] in prunekit.training.DEFAULT_TARGETS
                           for n in changed)  # fmt: skip
    assert not model.training
    assert all(
        p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), base.parameters(), strict=True)
    )
    assert report.to_json()  # JSON-able


def test_same_seed_identical_weights_other_seed_differs(base):
    a, b, c = (copy.deepcopy(base) for _ in range(3))
    prunekit.recover(a, DATA, seed=3, **FAST)
    prunekit.recover(b, DATA, seed=3, **FAST)
    prunekit.recover(c, DATA, seed=4, **FAST)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert any(not torch.equal(sa[n], sc[n]) for n in sa)


def test_dtype_kept_and_trained_in_float32(base):
    model = copy.deepcopy(base).to(torch.bfloat16)
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    report = prunekit.recover(model, DATA, **FAST)
    assert report.train_dtype == "torch.float32"
    assert {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]} == dtypes
    assert lm_loss(model, DATA) < lm_loss(base.to(torch.float32), DATA)


def test_save_then_load_pruned_identical(base, tmp_path):
    model = copy.deepcopy(base)
    prunekit.recover(model, DATA, **FAST)
    model.save_pretrained(tmp_path)
    loaded = prunekit.load_pruned(tmp_path, dtype=torch.float32).eval()
    x = DATA[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_skips_zero_width_and_no_attention(base):
    model = copy.deepcopy(base)
    layer = model.model.layers[1]
    shrink_layer(
        layer,
        LayerKeep(q_heads=torch.tensor([], dtype=torch.long), channels=torch.tensor([], dtype=torch.long)),
    )
    assert isinstance(layer.self_attn, NoAttention) and layer.mlp.gate_proj.weight.numel() == 0
    names = lora_targets(model)
    assert names and not any(".layers.1." in n for n in names) and len(names) == 2 * 7
    prunekit.recover(model, DATA, **dict(FAST, steps=2))
    assert layer.mlp.gate_proj.weight.shape == (0, 64) and isinstance(layer.self_attn, NoAttention)


def test_strings_with_tokenizer():
    class Chars:  # a character-level tokenizer: id = byte value
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

    model = pruned()
    texts = ["the cat sat on the mat. " * 8, "  ", "a dog ran in the fog. " * 8]
    report = prunekit.recover(model, texts, tokenizer=Chars(), seq_len=32, **dict(FAST, steps=2))
    n_chars = len((texts[0] + "\n\n" + texts[2]).encode())
    assert report.windows == n_chars // 32 and report.seq_len == 32
    with pytest.raises(ValueError, match="tokenizer="):
        prunekit.recover(model, texts, **FAST)


def test_failure_leaves_model_unchanged(base):
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise RuntimeError("boom")

    model = copy.deepcopy(base).to(torch.bfloat16)
    ref = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        prunekit.recover(model, DATA, callbacks=[Boom()], **FAST)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    sd = model.state_dict()
    assert sd.keys() == ref.keys() and all(
        torch.equal(sd[n], ref[n]) and sd[n].dtype == ref[n].dtype for n in ref
    )


def test_errors(base):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="texts is empty"):
        prunekit.recover(model, [], **FAST)
    with pytest.raises(ValueError, match="steps must be an int >= 1; got 0"):
        prunekit.recover(model, DATA, **dict(FAST, steps=0))
    with pytest.raises(ValueError, match="lora_rank must be an int >= 1; got 0"):
        prunekit.recover(model, DATA, lora_rank=0, **FAST)
    with pytest.raises(ValueError, match="fewer than seq_len=256"):
        prunekit.recover(model, [PHRASE], **FAST)
    with pytest.raises(UnsupportedModelError, match="nothing for LoRA to adapt"):
        prunekit.recover(model, DATA, targets=("fc1",), **FAST)
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(LlamaConfig(**dict(TXT, num_hidden_layers=2))).eval()
    ref = {n: t.clone() for n, t in fresh.state_dict().items()}
    with prunekit.prune_weights(fresh, "flap", 0.3, calibration=CAL):
        with pytest.raises(PrunekitError, match=r"call finalize\(\)"):
            prunekit.recover(fresh, DATA, **FAST)
    assert all(torch.equal(fresh.state_dict()[n], ref[n]) for n in ref)
