"""The training harness (prunekit.training): resuming from a checkpoint reaches the same weights as
an uninterrupted run; extra loss terms reach the gradient and are recorded; the straight-through
estimators, the step schedule and the gradient mask on hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from prunekit.training import GradientMask, StepSchedule, ste_heaviside, straight_through, train_causal_lm
from tiny import llama


def windows(n: int = 8, T: int = 16) -> torch.Tensor:
    return torch.randint(3, 200, (n, T), generator=torch.Generator().manual_seed(0))


def trainable(seed: int = 0):
    m = llama("eager", seed=seed)
    for name, p in m.named_parameters():
        p.requires_grad_(name.startswith("model.layers.0."))
    return m


def test_resume_reaches_the_same_weights_as_one_run(tmp_path):
    straight = trainable()
    train_causal_lm(straight, windows(), steps=6, batch_size=2, lr=1e-3, seed=3, progress=False)
    first = trainable()
    # an interrupted run: 6 steps planned, checkpoint at 3, killed after it (stopped by a callback)
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    train_causal_lm(first, windows(), steps=6, batch_size=2, lr=1e-3, seed=3, progress=False,
                    checkpoint_dir=str(tmp_path), save_steps=3, callbacks=[Stop()])  # fmt: skip
    resumed = trainable()
    res = train_causal_lm(resumed, windows(), steps=6, batch_size=2, lr=1e-3, seed=3, progress=False,
                          checkpoint_dir=str(tmp_path), save_steps=3, resume=True)  # fmt: skip
    assert res.steps == 6 and len(res.losses) == 3  # only steps 4..6 ran here
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.equal(
        straight.model.layers[0].mlp.up_proj.weight, trainable().model.layers[0].mlp.up_proj.weight
    )


def test_loss_fn_terms_are_added_recorded_and_see_the_step():
    m = trainable()
    seen = []

    def extra(model, inputs, outputs, step):
        seen.append(step)
        w = model.model.layers[0].mlp.up_proj.weight
        return {"l2": 100.0 * w.pow(2).sum(), "zero": torch.zeros(())}

    res = train_causal_lm(m, windows(), steps=3, batch_size=2, lr=1e-2, seed=0, progress=False, loss_fn=extra)
    assert seen == [0, 1, 2]
    assert [sorted(t) for t in res.terms] == [["l2", "zero"]] * 3
    assert res.terms[-1]["l2"] < res.terms[0]["l2"]  # the term's gradient shrank the weight
    assert all(tot > t["l2"] for tot, t in zip(res.losses, res.terms, strict=True))  # plus the LM loss
    only = train_causal_lm(
        trainable(), windows(), steps=1, batch_size=2, progress=False, loss_fn=extra, lm_loss=False
    )
    assert only.losses[0] == pytest.approx(only.terms[0]["l2"], rel=1e-5)


def test_straight_through_and_heaviside():
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    y = ste_heaviside(x)
    assert y.tolist() == [0.0, 1.0, 1.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]  # identity gradient
    s = torch.tensor([0.3], requires_grad=True)
    z = straight_through(torch.tensor([1.0]), s * 2)
    assert z.item() == 1.0
    z.backward()
    assert s.grad.item() == 2.0


def test_step_schedule_and_gradient_mask():
    m = trainable()
    calls = []
    w = m.model.layers[0].mlp.up_proj.weight
    before = w.detach().clone()
    mask = torch.zeros_like(w)
    mask[:3] = 1
    schedule = StepSchedule(lambda s, n: calls.append((s, n)))
    train_causal_lm(m, windows(), steps=4, batch_size=2, lr=1e-2, progress=False,
                    callbacks=[schedule, GradientMask([(w, mask)])])  # fmt: skip
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert torch.equal(w[3:], before[3:]) and not torch.equal(w[:3], before[:3])
    with pytest.raises(ValueError, match="gradient mask of shape"):
        GradientMask([(w, torch.ones(2))])


def test_errors():
    with pytest.raises(ValueError, match="lm_loss=False needs a loss_fn"):
        train_causal_lm(trainable(), windows(), steps=1, lm_loss=False)
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        train_causal_lm(trainable(), windows(), steps=1, loss_fn=3)
