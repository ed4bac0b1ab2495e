"""Snapshots proving a model is exactly what it was: hooks, attributes, parameters, buffers (also
the non-persistent ones, e.g. rotary tables), modes."""

from __future__ import annotations

import hashlib

import torch


def snapshot(model: torch.nn.Module) -> dict:
    hooks, attrs, modes = {}, {}, {}
    for name, m in model.named_modules():
        hooks[name] = (
            len(m._forward_pre_hooks),
            len(m._forward_hooks),
            len(m._backward_hooks),
            len(getattr(m, "_forward_pre_hooks_with_kwargs", {})),
            len(getattr(m, "_forward_hooks_with_kwargs", {})),
        )
        attrs[name] = sorted(m.__dict__)
        modes[name] = m.training
    return {
        "hooks": hooks,
        "attrs": attrs,
        "modes": modes,
        "params": _digest(model.state_dict().items()),
        "buffers": _digest(model.named_buffers(remove_duplicate=False)),
    }


def _digest(named) -> str:
    h = hashlib.sha256()
    for name, p in sorted(named, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    return h.hexdigest()


def assert_same(before: dict, after: dict) -> None:
    for key in ("hooks", "attrs", "modes"):
        diff = {
            k: (before[key].get(k), after[key].get(k))
            for k in before[key]
            if before[key][k] != after[key].get(k)
        }
        assert not diff, f"{key} changed: {list(diff.items())[:3]}"
    assert before["params"] == after["params"], "parameters changed"
    assert before["buffers"] == after["buffers"], "buffers changed"
