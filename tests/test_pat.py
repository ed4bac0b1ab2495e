"""PAT (prunekit.training.pat): HSMs by hooks, the mask schedule and losses, the hidden-size merge.

Expected values are worked by hand from the formulas of spec training-aware.md §2; the merged model
is checked against the hooked one (a different computation: forward hooks on the wide model)."""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.training import pat_tuning as P
from tiny import llama

X = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def perturb(mods, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mods.mask.theta.copy_(torch.randn(mods.mask.theta.shape, generator=g))
        for h in mods.hsms():
            if h.identity:
                h.A.weight.add_(0.1 * torch.randn(h.A.weight.shape, generator=g))
                h.B.weight.copy_(0.05 * torch.randn(h.B.weight.shape, generator=g))
                h.s.copy_(0.5 + torch.rand(h.s.shape, generator=g))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, snap):
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("tie,tied", [(True, "mask"), (True, "untie"), (False, "mask")])
def test_hsms_at_init_are_identity(tie, tied):
    model = llama(tie_word_embeddings=tie)
    dense = logits(model)
    model.train()  # the scheduled gate; at t = 0 it is sigmoid(0) + 0.5 = 1
    with P.attach(model, 0.75, tied=tied) as mods:
        mods.mask.set_step(0, 100)
        assert mods.embed.identity == (not (tie and tied == "mask"))
        assert torch.equal(logits(model), dense)
    assert no_hooks(model) and not hasattr(model, "prunekit_pat")


# --------------------------------------------------------------------------- schedule, by hand


def test_schedule_values_by_hand():
    # T = 100: ln(10)/ln(100) = 1/2, so tau(10) = 1/(0.5 + 1e-6); b(10) = 0.5 - 0.1 = 0.4
    assert P.tau(0, 100) == pytest.approx(1 / (1 + 1e-6), abs=1e-12)
    assert P.tau(1, 100) == pytest.approx(1 / (1 + 1e-6), abs=1e-12)  # max(1, t)
    assert P.tau(10, 100) == pytest.approx(1 / 0.500001, abs=1e-12)
    # T = 10000: ln(1000)/ln(10000) = 3/4 -> tau = 1/(0.25 + 1e-6)
    assert P.tau(1000, 10_000) == pytest.approx(1 / 0.250001, abs=1e-9)
    assert P.bias(10, 100) == pytest.approx(0.4)
    assert P.bias(50, 100) == 0.0 and P.bias(70, 100) == 0.0
    # clipped sigmoid: floor 1/(1 + e^10) and no gradient below it
    z = torch.tensor([0.0, -20.0, 3.0], requires_grad=True)
    s = P.clipped_sigmoid(z)
    assert s.tolist() == pytest.approx([0.5, 1 / (1 + math.exp(10)), 1 / (1 + math.exp(-3))], rel=1e-6)
    s.sum().backward()
    assert z.grad[1] == 0 and z.grad[0] == pytest.approx(0.25)


def test_gate_on_hand_worked_steps():
    mask = P.USM(3, keep=2)
    with torch.no_grad():
        mask.theta.copy_(torch.tensor([0.0, 0.1, -0.2]))
    mask.train()
    mask.set_step(10, 100)  # tau = 1/0.500001 ~ 2, b = 0.4
    t = 1 / 0.500001
    want = [0.5 + 0.4, 1 / (1 + math.exp(-0.1 * t)) + 0.4, 1 / (1 + math.exp(0.2 * t)) + 0.4]
    g = mask.gate()
    assert g.tolist() == pytest.approx(want, rel=1e-6)
    g.sum().backward()  # before 0.8T the gate trains the mask: d g/d m = tau * s(1 - s)
    assert mask.theta.grad[0] == pytest.approx(t * 0.25, rel=1e-6)
    # t = 90 >= 0.8T = 80: tau frozen at tau(80) = 1/(1 - ln 80/ln 100 + 1e-6), b = 0, mask detached
    mask.theta.grad = None
    mask.set_step(90, 100)
    t80 = 1 / (1 - math.log(80) / math.log(100) + 1e-6)
    g = mask.gate()
    assert g.tolist() == pytest.approx(
        [0.5, 1 / (1 + math.exp(-0.1 * t80)), 1 / (1 + math.exp(0.2 * t80))], rel=1e-6
    )
    assert not g.requires_grad
    # inference: hard, exactly `keep` channels (the largest m) by default; m > 0 when faithful
    m4 = torch.tensor([0.3, -0.1, 0.05, 0.2])
    for faithful, kept in ((False, [1, 0, 0, 1]), (True, [1, 0, 1, 1])):
        mk = P.USM(4, keep=2, faithful=faithful)
        with torch.no_grad():
            mk.theta.copy_(m4)
        mk.eval()
        assert mk.gate().tolist() == kept


def test_mask_scale_reparametrises():
    mask = P.USM(2, keep=1, mask_scale=4.0)
    with torch.no_grad():
        mask.theta.copy_(torch.tensor([0.1, -0.1]))
    assert mask.m.tolist() == pytest.approx([0.4, -0.4])


# --------------------------------------------------------------------------- losses, by hand


def test_mask_loss_and_straight_through_gradient_by_hand():
    m = torch.tensor([0.6, 0.2, -0.4, 0.0])
    # default: H = 1[m > 0] -> 2 kept = D: count term 0; pos mean ((.1)^2 + (-.3)^2)/2 = .05;
    # neg {-.4, 0}: ((.1)^2 + (.5)^2)/2 = .13
    # faithful: H = 1[m >= 0] -> 3: 10 * |3 - 2| / 2 = 5, plus the same .18
    for faithful, want, grad in (
        (False, 0.18, [0.1, -0.3, 0.1, 0.5]),  # d|0|/dx = 0 for the count term
        (True, 5.18, [5.1, 4.7, 5.1, 5.5]),  # straight-through: 10 * sign(3 - 2) / 2 = 5 on every m
    ):
        mask = P.USM(4, keep=2, faithful=faithful)
        with torch.no_grad():
            mask.theta.copy_(m)
        loss = mask.loss()
        assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
        loss.backward()
        assert mask.theta.grad.tolist() == pytest.approx(grad, rel=1e-6)


def test_mask_loss_guards_the_empty_mean():
    # all m = 0 (t = 0): the official mean over {m > 0} is NaN; guarded: 10 * |0 - 2| / 2 + 0.25
    loss = P.USM(4, keep=2).loss()
    assert float(loss.detach()) == pytest.approx(10.25)
    # faithful: H counts all 4 as kept: 10 * |4 - 2| / 2 + 0.25
    assert float(P.USM(4, keep=2, faithful=True).loss()) == pytest.approx(10.25)


def test_identity_loss_by_hand():
    h = P.HSM(3, 2)
    with torch.no_grad():
        h.A.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]))
    assert float(h.id_loss()) == pytest.approx(9 / 4)  # A A^T - I = diag(0, 3)


@pytest.mark.parametrize("tie,faithful,want", [(True, False, 8), (True, True, 2), (False, True, 3)])
def test_which_identity_losses_reach_the_loss(tie, faithful, want):
    model = llama(tie_word_embeddings=tie)  # 4 layers
    with P.attach(model, 0.75, rank=4, faithful=faithful) as mods:
        with torch.no_grad():
            for h in mods.hsms():
                if h.identity:
                    h.A.weight.zero_()  # each L_id = mean(I_4^2) = 1/4
        assert float(mods.losses()["identity"]) == pytest.approx(want / 4)


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("tie,tied", [(True, "mask"), (True, "untie"), (False, "mask")])
def test_merged_equals_hooked(tie, tied):
    model = llama(tie_word_embeddings=tie)
    mods = P.attach(model, 40, tied=tied)
    perturb(mods)
    model.eval()
    hooked = logits(model)
    kept = mods.mask.m.detach().argsort(descending=True)[:40].sort().values.tolist()
    info = P.merge(model, mods, tied=tied)
    assert info["hidden"] == (64, 40) and info["kept"] == kept
    assert model.config.hidden_size == 40 and model.config.head_dim == 16
    assert model.model.embed_tokens.weight.shape == (256, 40)
    assert model.lm_head.weight.shape == (256, 40)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 40)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (40, 128)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (tie and tied == "mask")
    merged = logits(model)
    assert (merged - hooked).abs().max() < 1e-5 * hooked.abs().max()
    assert no_hooks(model) and not hasattr(model, "prunekit_pat")


def test_faithful_merge_ignores_the_scale():
    errors = []
    for unit_scale in (False, True):
        model = llama(tie_word_embeddings=False)
        mods = P.attach(model, 40, faithful=True)
        perturb(mods)
        if unit_scale:
            with torch.no_grad():
                for h in mods.hsms():
                    h.s.fill_(1.0)
        model.eval()
        hooked = logits(model)
        kept = int((mods.mask.m > 0).sum())
        P.merge(model, mods)
        assert model.config.hidden_size == kept  # the threshold, not the asked 40 (quirk 3)
        errors.append(float((logits(model) - hooked).abs().max()))
    # s dropped (quirk 4): far off; with s = 1 only the unscaled norm epsilon differs (quirk 5)
    assert errors[1] < 1e-2 and errors[0] > 10 * errors[1]


def test_merged_model_saves_reloads_and_generates(tmp_path):
    model = llama(tie_word_embeddings=True)
    mods = P.attach(model, 0.75)
    perturb(mods)
    model.eval()
    P.merge(model, mods)
    want = logits(model)
    model.save_pretrained(tmp_path)
    back = prunekit.load_pruned(tmp_path, dtype=torch.float32).eval()
    assert back.config.hidden_size == 48
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(logits(back), want)
    out = back.generate(X[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)
    assert torch.equal(out, model.generate(X[:1], max_new_tokens=4, do_sample=False))


# --------------------------------------------------------------------------- the one call


def test_pat_trains_and_merges():
    model = llama(tie_word_embeddings=True)
    ids = torch.randint(3, 250, (24, 32), generator=torch.Generator().manual_seed(0))
    rep = P.pat(model, ids, keep=0.75, steps=4, rank=8, lora_rank=4, progress=False)
    assert (rep.hidden_before, rep.hidden_after, rep.keep) == (64, 48, 48)
    assert rep.steps == 4 and len(rep.losses) == 4 and set(rep.terms_last) == {"mask", "identity"}
    assert rep.merge_error < 1e-4
    assert rep.params_after == sum(p.numel() for p in model.parameters()) < rep.params_before
    assert model.config.hidden_size == 48 and not model.training
    assert not any(p.requires_grad is False for p in model.parameters())  # as they were
    assert "peft_config" not in model.__dict__ and no_hooks(model)
    assert torch.isfinite(logits(model)).all()


def test_pat_resumes_from_a_checkpoint_to_the_same_model(tmp_path):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):  # an interrupted run: 6 steps planned, killed after the step-3 save
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    ids = torch.randint(3, 250, (24, 32), generator=torch.Generator().manual_seed(0))
    kw = {"keep": 0.75, "steps": 6, "rank": 8, "lora_rank": 4, "lr": 1e-2, "progress": False}
    straight = llama(tie_word_embeddings=True)
    P.pat(straight, ids, **kw)
    P.pat(llama(tie_word_embeddings=True), ids, **kw, checkpoint_dir=str(tmp_path), save_steps=3,
          callbacks=[Stop()])  # fmt: skip
    assert (tmp_path / "checkpoint-3" / P.MODULES_FILE).is_file()
    resumed = llama(tie_word_embeddings=True)
    rep = P.pat(resumed, ids, **kw, checkpoint_dir=str(tmp_path), save_steps=3, resume=True)
    assert rep.steps == 6 and len(rep.losses) == 3  # only steps 4..6 ran here
    assert torch.allclose(logits(resumed), logits(straight), atol=1e-5)
    # without the saved HSMs and mask the resumed run would differ: the mask moved in steps 1..3
    from safetensors.torch import load_file

    theta = load_file(str(tmp_path / "checkpoint-3" / P.MODULES_FILE))["mask.theta"]
    assert theta.abs().max() > 0  # the mask starts at 0 and had moved, so the resume had to load it


def test_pat_resume_errors(tmp_path):
    ids = torch.randint(3, 250, (8, 32))
    model = llama()
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        P.pat(model, ids, steps=2, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        P.pat(model, ids, steps=2, resume=True, checkpoint_dir=str(tmp_path), progress=False)
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no prunekit_pat\.safetensors"):
        P.pat(model, ids, steps=2, resume=True, checkpoint_dir=str(tmp_path), progress=False)
    assert no_hooks(model) and model.config.hidden_size == 64


def test_pat_restores_the_model_after_an_exception():
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                raise RuntimeError("boom")

    model = llama(tie_word_embeddings=True)
    snap, dense = snapshot(model), logits(model)
    grads = [p.requires_grad for p in model.parameters()]
    ids = torch.randint(3, 250, (24, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="boom"):
        P.pat(model, ids, steps=4, rank=8, callbacks=[Boom()], progress=False)
    assert same_state(model, snap) and no_hooks(model) and not hasattr(model, "prunekit_pat")
    assert [p.requires_grad for p in model.parameters()] == grads
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.eval()
    assert torch.equal(logits(model), dense)


def test_attach_context_restores_after_an_exception():
    model = llama()
    snap, dense = snapshot(model), logits(model)
    with pytest.raises(ValueError, match="inside"), P.attach(model, 0.5) as mods:
        perturb(mods)
        logits(model)
        raise ValueError("inside")
    assert same_state(model, snap) and no_hooks(model)
    assert torch.equal(logits(model), dense)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"keep": 1.5}, r"keep as a fraction must be in \(0, 1\)"),
        ({"keep": 0}, r"between 1 and 63"),
        ({"keep": 64}, r"between 1 and 63"),
        ({"keep": True}, r"keep must be a fraction"),
        ({"keep": "half"}, r"keep must be a fraction"),
        ({"tied": "share"}, r"tied must be one of \('mask', 'untie'\)"),
        ({"rank": 0}, r"rank must be an int >= 1"),
    ],
)
def test_attach_errors(kw, match):
    model = llama()
    with pytest.raises(ValueError, match=match):
        P.attach(model, **{"keep": 0.5, **kw})
    assert no_hooks(model)


def test_pat_errors():
    model = llama()
    ids = torch.randint(3, 250, (8, 32))
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        P.pat(model, ids, steps=1, progress=False)
    with pytest.raises(ValueError, match="keep as a fraction"):
        P.pat(model, ids, keep=1.0, steps=2, progress=False)
    with pytest.raises(ValueError, match="mask_lr must be > 0"):
        P.pat(model, ids, steps=2, mask_lr=0.0, progress=False)
    with P.attach(model, 0.5):
        with pytest.raises(PrunekitError, match="already attached"):
            P.attach(model, 0.5)
    other = llama()
    mods = P.attach(other, 0.5)
    with pytest.raises(PrunekitError, match="not attached to this model"):
        P.merge(model, mods)
    mods.remove()
