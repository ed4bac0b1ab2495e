"""KD on the pruned data (Ben-Baruch et al., ICML 2025): the loss against explicit sums, the
α heuristic, the errors, and the transformers ``Trainer`` against a plain loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.data.kd import (
    AUTO_ALPHA,
    IndexedSubset,
    KDLoss,
    KDTrainer,
    alpha_for_fraction,
    cache_teacher_logits,
    default_tau,
    kd_loss,
    train_kd,
)


def _kl_by_hand(zs: torch.Tensor, zt: torch.Tensor, tau: float) -> float:
    """Σ_c p·log(p/q) per row, averaged over rows, with p, q the tempered softmaxes (explicit exps)."""
    zs, zt = zs.double(), zt.double()
    total = 0.0
    for r in range(zs.shape[0]):
        es, et = [math.exp(float(v) / tau) for v in zs[r]], [math.exp(float(v) / tau) for v in zt[r]]
        q = [e / sum(es) for e in es]
        p = [e / sum(et) for e in et]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    return total / zs.shape[0]


def _ce_by_hand(zs: torch.Tensor, y: torch.Tensor) -> float:
    zs = zs.double()
    total = 0.0
    for r in range(zs.shape[0]):
        lse = math.log(sum(math.exp(float(v)) for v in zs[r]))
        total += lse - float(zs[r, int(y[r])])
    return total / zs.shape[0]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(5, 4, generator=g) * 2
    zt = torch.randn(5, 4, generator=g) * 2
    y = torch.tensor([0, 3, 1, 1, 2])
    return zs, zt, y


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_kd_loss_equals_explicit_sums(logits, alpha, tau):
    zs, zt, y = logits
    want = (1 - alpha) * _ce_by_hand(zs, y) + alpha * tau**2 * _kl_by_hand(zs, zt, tau)
    got = float(kd_loss(zs, y, zt, alpha, tau))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_alpha_0_is_cross_entropy_and_alpha_1_is_scaled_kl(logits):
    zs, zt, y = logits
    assert float(kd_loss(zs, y, zt, 0.0, 4.0)) == pytest.approx(float(F.cross_entropy(zs, y)), rel=1e-6)
    kl = F.kl_div(F.log_softmax(zs / 4, -1), F.softmax(zt / 4, -1), reduction="batchmean")
    assert float(kd_loss(zs, y, zt, 1.0, 4.0)) == pytest.approx(16 * float(kl), rel=1e-6)
    assert float(kd_loss(zs, None, zt, 1.0, 4.0)) == pytest.approx(
        16 * float(kl), rel=1e-6
    )  # no labels needed
    assert float(kd_loss(zt, None, zt, 1.0, 4.0)) == pytest.approx(0.0, abs=1e-6)  # student = teacher


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0, 8.0])
def test_gradient_at_alpha_1_is_tau_times_softmax_gap(logits, tau):
    """d(τ²·KL)/dz_s = τ²·(1/τ)·(q − p)/B = τ·(q − p)/B: the τ² factor undoes the 1/τ² that the
    softmax gap shrinks by at high τ, so gradient magnitudes stay comparable across τ (Hinton)."""
    zs, zt, _ = logits
    zs = zs.clone().requires_grad_(True)
    kd_loss(zs, None, zt, 1.0, tau).backward()
    q, p = F.softmax(zs.detach() / tau, -1), F.softmax(zt / tau, -1)
    torch.testing.assert_close(zs.grad, tau * (q - p) / zs.shape[0], rtol=1e-5, atol=1e-7)


def test_gradient_at_high_tau_tends_to_the_centred_logit_gap(logits):
    """For large τ, τ·(q − p) → ((z_s − mean z_s) − (z_t − mean z_t)) / C, independent of τ; the
    gap closes like 1/τ (the next term of the expansion is O(|z|²/τ))."""
    zs, zt, _ = logits
    B, C = zs.shape
    want = ((zs - zs.mean(-1, keepdim=True)) - (zt - zt.mean(-1, keepdim=True))) / (C * B)
    for tau, tol in ((100.0, 2e-2), (1000.0, 2e-3)):
        z = zs.clone().requires_grad_(True)
        kd_loss(z, None, zt, 1.0, tau).backward()
        assert (z.grad - want).abs().max() < tol * want.abs().max()


def test_token_level_logits_mask_ignored_positions():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    y = torch.tensor([[1, -100, 4], [-100, 0, 2]])
    keep = y != -100
    a, tau = 0.4, 2.0
    flat_s, flat_t, flat_y = zs[keep], zt[keep], y[keep]  # the 4 labelled positions
    want = (1 - a) * _ce_by_hand(flat_s, flat_y) + a * tau**2 * _kl_by_hand(flat_s, flat_t, tau)
    assert float(kd_loss(zs, y, zt, a, tau)) == pytest.approx(want, rel=1e-6)
    # shift: logits at t meet the label at t + 1 (transformers' causal-LM convention)
    ys = torch.tensor([[7, 1, -100], [9, -100, 2]])  # the first column is never a target
    s_keep = ys[:, 1:] != -100
    sh_s, sh_t, sh_y = zs[:, :-1][s_keep], zt[:, :-1][s_keep], ys[:, 1:][s_keep]
    want = (1 - a) * _ce_by_hand(sh_s, sh_y) + a * tau**2 * _kl_by_hand(sh_s, sh_t, tau)
    assert float(kd_loss(zs, ys, zt, a, tau, shift=True)) == pytest.approx(want, rel=1e-6)
    none = torch.full((2, 3), -100)
    z = zs.clone().requires_grad_(True)
    out = kd_loss(z, none, zt, a, tau)
    out.backward()
    assert float(out.detach()) == 0.0 and float(z.grad.abs().sum()) == 0.0


def test_alpha_for_fraction_at_and_between_anchors():
    assert AUTO_ALPHA == {1.0: 0.5, 0.5: 0.7, 0.1: 0.9}
    for f, a in AUTO_ALPHA.items():
        assert alpha_for_fraction(f) == pytest.approx(a)
    assert alpha_for_fraction(0.75) == pytest.approx(0.6)  # halfway between 0.5 and 1.0
    assert alpha_for_fraction(0.3) == pytest.approx(0.8)  # halfway between 0.1 and 0.5
    assert alpha_for_fraction(0.2) == pytest.approx(0.85)
    assert alpha_for_fraction(0.05) == pytest.approx(0.9)  # clamped below the lowest anchor
    assert alpha_for_fraction(0.4, {0.2: 0.0, 0.6: 1.0}) == pytest.approx(0.5)
    assert alpha_for_fraction(0.9, {0.2: 0.0, 0.6: 1.0}) == pytest.approx(1.0)  # clamped above
    assert KDLoss(alpha="auto", kept_fraction=0.3).alpha == pytest.approx(0.8)
    assert default_tau(2) == 2.0 and default_tau(10) == 4.0


def test_tau_auto_follows_the_class_count(logits):
    zs, zt, y = logits  # 4 classes -> τ = 4
    assert float(kd_loss(zs, y, zt, 0.5)) == pytest.approx(float(kd_loss(zs, y, zt, 0.5, 4.0)))
    z2s, z2t = zs[:, :2], zt[:, :2]
    y2 = torch.tensor([0, 1, 1, 0, 1])
    assert float(kd_loss(z2s, y2, z2t, 0.5)) == pytest.approx(float(kd_loss(z2s, y2, z2t, 0.5, 2.0)))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"alpha": 1.5}, r"alpha must be a float in \[0, 1\] or 'auto'; got 1.5"),
        ({"alpha": -0.1}, r"alpha must be a float in \[0, 1\] or 'auto'; got -0.1"),
        ({"alpha": "auto"}, r"resolve 'auto' with alpha_for_fraction"),
        ({"alpha": 0.5, "tau": 0}, r"tau must be a number > 0 or 'auto'; got 0"),
        ({"alpha": 0.5, "tau": -2.0}, r"tau must be a number > 0 or 'auto'; got -2.0"),
        ({"alpha": 0.5, "tau": "hot"}, r"tau must be a number > 0 or 'auto'; got 'hot'"),
    ],
)
def test_bad_alpha_and_tau_are_named(logits, kw, match):
    zs, zt, y = logits
    with pytest.raises(ValueError, match=match):
        kd_loss(zs, y, zt, **kw)


def test_bad_shapes_and_fractions_are_named(logits):
    zs, zt, y = logits
    with pytest.raises(ValueError, match=r"teacher_logits \(5, 3\) must have the student's shape \(5, 4\)"):
        kd_loss(zs, y, zt[:, :3], 0.5, 4.0)
    with pytest.raises(ValueError, match=r"labels \(4,\) must match the logits' leading dims \(5,\)"):
        kd_loss(zs, y[:4], zt, 0.5, 4.0)
    with pytest.raises(ValueError, match=r"labels=None is only allowed with alpha=1"):
        kd_loss(zs, None, zt, 0.5, 4.0)
    with pytest.raises(ValueError, match=r"fraction must be a kept fraction in \(0, 1\]; got 0"):
        alpha_for_fraction(0)
    with pytest.raises(ValueError, match=r"fraction must be a kept fraction in \(0, 1\]; got 1.2"):
        alpha_for_fraction(1.2)
    with pytest.raises(ValueError, match=r"alpha='auto' needs the kept fraction"):
        KDLoss(alpha="auto")
    with pytest.raises(ValueError, match=r"an anchor's alpha must be in \[0, 1\]; got 2"):
        alpha_for_fraction(0.5, {0.5: 2})


# ------------------------------------------------------------------ Trainer vs plain loop
class _Net(nn.Module):
    def __init__(self, seed: int, hidden: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(6, hidden), nn.Linear(hidden, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x, labels=None):
        return {"logits": self.fc2(torch.tanh(self.fc1(x)))}


class _Samples(torch.utils.data.Dataset):
    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


def _trainer_weights(tmp_path, student, data, **kd):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2,
        lr_scheduler_type="linear", max_grad_norm=0.0, weight_decay=0.0, optim="adamw_torch", seed=0,
        train_sampling_strategy="sequential", logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = KDTrainer(model=student, args=args, train_dataset=data, **kd)
    trainer.train()
    return trainer, {k: v.detach().clone() for k, v in student.state_dict().items()}


def _loop_batches(base: _Samples, indices: list[int]) -> list[dict]:
    out = []
    for s in range(0, len(indices), 4):
        idx = indices[s : s + 4]
        out.append({"x": base.x[idx], "labels": base.y[idx], "sample_index": torch.tensor(idx)})
    return out


@pytest.mark.parametrize("cached", [False, True])
def test_kd_trainer_matches_a_plain_loop_with_kd_loss(tmp_path, cached):
    base, teacher = _Samples(), _Net(seed=7, hidden=16)
    kept = [1, 4, 5, 8, 13, 17, 20, 22, 27, 31, 33, 38]  # a pruned subset: 12 of 40, 3 batches
    subset = IndexedSubset(base, kept)
    item = subset[1]
    assert subset.kept_fraction == pytest.approx(0.3) and item["sample_index"] == 4
    assert torch.equal(item["x"], base.x[4]) and int(item["labels"]) == int(base.y[4])
    cache = cache_teacher_logits(teacher, base, batch_size=7) if cached else None
    if cached:
        torch.testing.assert_close(cache, teacher(base.x)["logits"].detach())
    kd = {"teacher": None if cached else teacher, "teacher_logits": cache, "alpha": "auto", "tau": 2.0}
    trainer, got = _trainer_weights(tmp_path, _Net(seed=1), subset, **kd)
    assert trainer.kd_alpha == pytest.approx(0.8)  # 'auto' at the subset's kept fraction 0.3
    assert trainer.state.global_step == 6
    student = _Net(seed=1)
    res = train_kd(
        student, None if cached else teacher, _loop_batches(base, kept), epochs=2, alpha="auto",
        kept_fraction=0.3, tau=2.0, teacher_logits=cache, lr=1e-2, schedule="linear",
    )  # fmt: skip
    assert res.steps == 6 and res.alpha == pytest.approx(0.8)
    want = student.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["fc1.weight"], _Net(seed=1).fc1.weight)  # it trained
    if not cached:  # the teacher given was frozen in eval mode
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_teacher_in_train_mode_is_run_in_eval_mode(tmp_path):
    """A BatchNorm teacher left in train mode would use batch statistics; KD must use its running ones."""

    class _BNNet(_Net):
        def __init__(self, seed):
            super().__init__(seed)
            self.bn = nn.BatchNorm1d(6)
            self.bn.running_mean.fill_(0.5)

        def forward(self, x, labels=None):
            return super().forward(self.bn(x))

    base, teacher = _Samples(), _BNNet(seed=7).train()
    b = _loop_batches(base, list(range(8)))
    student = _Net(seed=1)
    res = train_kd(student, teacher, b[:1], epochs=1, alpha=1.0, tau=1.0, schedule="constant", lr=1e-9)
    teacher.eval()
    with torch.no_grad():
        want = kd_loss(_Net(seed=1)(b[0]["x"])["logits"], None, teacher(b[0]["x"])["logits"], 1.0, 1.0)
    assert res.losses[0] == pytest.approx(float(want), rel=1e-6)


def test_cached_logits_without_indices_fail_clearly():
    base = _Samples()
    batches = [{"x": base.x[:4], "labels": base.y[:4]}]
    with pytest.raises(ValueError, match="cached teacher_logits need each batch's sample indices"):
        train_kd(_Net(seed=1), None, batches, teacher_logits=torch.zeros(40, 3), alpha=0.5, tau=2.0)
    with pytest.raises(ValueError, match=r"KD with alpha=0.5 needs a teacher model or cached teacher_logits"):
        train_kd(_Net(seed=1), None, batches, alpha=0.5)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 39\]"):
        IndexedSubset(base, [0, 40])


# ------------------------------------------------------------------ the registry method kd_data
def test_kd_data_prunes_with_its_score_and_plans_kd(tmp_path):
    import prunekit
    from prunekit.data import KDData, KDPlan, random_subset

    base, teacher = _Samples(), _Net(seed=7, hidden=16)
    plan = KDData(score="random_data", alpha="auto", tau=2.0)(base, keep=0.3, teacher=teacher, seed=5)
    assert (
        isinstance(plan, KDPlan)
        and plan.alpha == pytest.approx(0.8)
        and plan.kept_fraction == pytest.approx(0.3)
    )
    assert torch.equal(plan.report.indices, random_subset(40, 0.3, seed=5))  # 12 of 40 under seed 5
    assert [plan.subset[j]["sample_index"] for j in range(3)] == plan.report.indices[:3].tolist()
    # through prune_data, kd_data selects exactly as its score method
    a = prunekit.prune_data(base, "kd_data", 0.25, model=teacher, score="el2n")
    b = prunekit.prune_data(base, "el2n", 0.25, model=teacher)
    assert torch.equal(a.indices, b.indices) and a.kept == 10
    # cached logits for the kept samples, then the same training as with the live teacher
    cached = KDData(alpha=0.5, tau=2.0)(base, keep=0.3, teacher=teacher, seed=5, cache=True)
    idx = cached.report.indices
    torch.testing.assert_close(cached.teacher_logits[idx], teacher(base.x[idx])["logits"].detach())
    s1, s2 = _Net(seed=1), _Net(seed=1)
    plan_live = KDData(alpha=0.5, tau=2.0)(base, keep=0.3, teacher=teacher, seed=5)
    r1 = plan_live.train(s1, epochs=2, batch_size=4, seed=0, lr=1e-2)
    r2 = KDPlan(**{**cached.__dict__, "teacher": None}).train(s2, epochs=2, batch_size=4, seed=0, lr=1e-2)
    assert r1.steps == r2.steps == 6
    for k, v in s1.state_dict().items():
        torch.testing.assert_close(v, s2.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_kd_data_errors_name_the_bad_value():
    from prunekit.data import KDData

    with pytest.raises(
        ValueError, match=r"score must be a data method that selects samples \(.*el2n.*\); got 'kd_data'"
    ):
        KDData(score="kd_data")
    with pytest.raises(prunekit_errors().UnknownMethodError, match="unknown data method 'el2m'"):
        KDData(score="el2m")
    with pytest.raises(ValueError, match=r"alpha must be a float in \[0, 1\] or 'auto'; got 'max'"):
        KDData(alpha="max")
    with pytest.raises(ValueError, match=r"tau must be a number > 0 or 'auto'; got 0"):
        KDData(tau=0)
    with pytest.raises(ValueError, match=r"KD with alpha=0.9 needs teacher="):
        KDData(alpha="auto")(_Samples(), keep=0.1)
    with pytest.raises(ValueError, match=r"keep=1.5 is out of range"):
        KDData(alpha=0.0)(_Samples(), keep=1.5)
    assert KDData(alpha=0.0)(_Samples(), keep=0.5).alpha == 0.0  # no KD: no teacher needed


def prunekit_errors():
    import prunekit.errors

    return prunekit.errors


def test_kd_trainer_on_a_causal_lm_shifts_and_masks_like_the_model(tmp_path):
    """Token-level KD on a tiny Llama: the Trainer's loss is kd_loss with the labels shifted (its
    causal-LM rule), and at alpha=0 it is the model's own next-token loss."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    cfg = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student, teacher = LlamaForCausalLM(LlamaConfig(**cfg)), LlamaForCausalLM(LlamaConfig(**cfg))
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt: no loss on its tokens
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    for alpha in (0.0, 0.7):
        trainer = KDTrainer(model=student, args=args, teacher=teacher, alpha=alpha, tau=2.0)
        with torch.no_grad():
            got = trainer.compute_loss(student, {"input_ids": ids, "labels": labels})
            zs, zt = student(input_ids=ids).logits, teacher(input_ids=ids).logits
            want = kd_loss(zs, labels, zt, alpha, 2.0, shift=True)
        assert float(got) == pytest.approx(float(want), rel=1e-6)
        if alpha == 0:
            own = student(input_ids=ids, labels=labels).loss.detach()
            assert float(got) == pytest.approx(float(own), rel=1e-5)


def test_kd_trainer_gradient_accumulation_equals_the_whole_batch(tmp_path):
    """Two micro-batches of 2 with accumulation = one batch of 4 (SGD, so a loss scaled twice would
    show): the KD loss is a per-micro-batch mean that the Trainer divides by the accumulation steps."""
    from transformers import TrainingArguments

    base, teacher = _Samples(n=8), _Net(seed=7, hidden=16)
    weights = []
    for bs, acc in ((4, 1), (2, 2)):
        student = _Net(seed=1)
        args = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=bs, gradient_accumulation_steps=acc,
            max_steps=2, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
            train_sampling_strategy="sequential", report_to="none", use_cpu=True, disable_tqdm=True,
            logging_strategy="no", save_strategy="no",
        )  # fmt: skip
        KDTrainer(model=student, args=args, train_dataset=base, teacher=teacher, alpha=0.6, tau=2.0).train()
        weights.append(student.state_dict())
    assert not torch.equal(weights[0]["fc1.weight"], _Net(seed=1).fc1.weight)
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-6)
