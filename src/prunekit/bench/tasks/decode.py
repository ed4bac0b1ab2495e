"""``decode-speed``: greedy decoding against speculative tree decoding (:mod:`prunekit.speculative`,
issue 24) on the model under test, dense or weight-pruned.

The prompts are the Spec-Bench-like categories of :mod:`prunekit.speculative.tasks`, in turn
(summarization, context_qa, numbers, continuation, summarization, ...; ``limit`` prompts, default
4, one per category), chat-templated, at most :attr:`DecodeSpeed.max_prompt_tokens` tokens (longer
ones are dropped, not cut). For each prompt, in one process and interleaved, the task runs plain
greedy decoding (transformers' ``model.generate``, ``do_sample=False``, a bare generation config so
that no logits processor of the checkpoint's defaults applies), then each drafter of
:attr:`DecodeSpeed.drafters` through ``prunekit.speculative.generate`` (``tree=`` :attr:`DecodeSpeed.tree`,
default ``"auto"``: the node budget fitted to this device's forward costs), all with the same
``max_new_tokens`` and EOS id (the tokenizer's). One untimed warm-up round of every variant on the
first prompt (4 new tokens) comes first. Wall time is the host clock around each call (CUDA
synchronised).

Metrics, per drafter ``<name>``:

- ``mat_<name>``: new tokens / target forwards, summed over prompts (mean accepted tokens per step);
- ``speedup_<name>``: greedy wall time / the drafter's wall time, each summed over prompts;
- ``identical_<name>``: the fraction of prompts whose output is token-identical to greedy (a
  lossless method must give 1.0); ``identical`` is the lowest over drafters;
- ``tok_s_<name>`` and ``greedy_tok_s``: new tokens per second;
- ``nodes_<name>``: draft nodes verified per target forward (the tree size the engine's
  ``tree="auto"`` budget chose, averaged over steps);
- ``share_<name>_<source>``: that source's share of the accepted draft tokens (the engine's
  ``stats.accepted``), for drafters with several sources (RASD: draft model, retrieval).

Primary metric: ``speedup``, the best drafter's speedup (higher is better). Agreement with dense
(KL and top-1 of the next-token distribution at the end of each prompt) says how far a pruned
model's own greedy output drifts; the speedups are each model's speculative decoding against its
own greedy decoding.

Families: dense and weight methods (a weight-pruned model is an ordinary model; its draft trees
are verified like dense ones). Token and KV methods are refused: see :attr:`DecodeSpeed.why_not`.
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch

from ...speculative.tasks import TASKS as CATEGORIES
from ...speculative.tasks import task_inputs
from ..models import Loaded
from .base import TaskOutput, Treat, next_token_agreement
from .lm import LMTask, Pair, _pad_id

WARMUP_TOKENS = 4


def _clock() -> float:
    return time.perf_counter()


def _sync(model) -> None:
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _speculative(model, input_ids: torch.Tensor, drafter, max_new_tokens: int, eos_token_id, **options):
    """``prunekit.speculative.generate`` (imported at call time)."""
    from ...speculative import generate

    return generate(
        model, input_ids, drafter=drafter, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, **options
    )


def _greedy(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id, pad_token_id) -> torch.Tensor:
    """Plain greedy ``model.generate`` with a bare generation config: ``(1, prompt + new)``."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=cfg)


class DecodeSpeed(LMTask):
    """Speculative tree decoding against greedy decoding: MAT, wall-clock speedup, identical output."""

    name = "decode-speed"
    primary = "speedup"
    higher_is_better = True
    default_limit = 4
    families = ("weights",)
    why_not = (
        "speculative decoding must give the model's own greedy output token for token, and its tree "
        "verifier builds its own mask, positions and cache compaction over the full prompt cache; token "
        "and KV methods drop or compress those positions, so the output would change (use a weight method)"
    )
    summary = "greedy vs speculative tree decoding (Token Recycling, RASD, prompt lookup): speedup, MAT"
    #: the drafters compared with greedy (names of ``prunekit.speculative.generate``)
    drafters: ClassVar[tuple[str, ...]] = ("token_recycling", "rasd", "prompt_lookup")
    max_new_tokens: ClassVar[int] = 48
    #: the engine's tree size: "auto" (fitted to the device's forward costs), "official" or an int
    tree: ClassVar[str | int] = "auto"
    max_prompt_tokens: ClassVar[int] = 768

    def prepare(self, loaded: Loaded) -> None:
        if self.prepared_for == loaded.name:
            return
        tok = loaded.tokenizer
        limit = getattr(loaded.model.config, "max_position_embeddings", None) or self.max_len
        cap = min(self.max_prompt_tokens, limit - self.max_new_tokens - 1)
        per = {c: len(range(i, self.limit, len(CATEGORIES))) for i, c in enumerate(CATEGORIES)}
        got = {c: task_inputs(tok, c, k, seed=self.seed, max_prompt_tokens=cap) for c, k in per.items() if k}
        self.categories = [CATEGORIES[i % len(CATEGORIES)] for i in range(self.limit)]
        self.inputs = [got[c][i // len(CATEGORIES)] for i, c in enumerate(self.categories)]
        self.pairs = [Pair(x[0].tolist(), [0]) for x in self.inputs]  # for LMTask.timing (prefill, decode)
        self.prepared_for = loaded.name

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        self.prepare(loaded)
        model, tok = loaded.model, loaded.tokenizer
        dev = next(model.parameters()).device
        eos, pad = tok.eos_token_id, _pad_id(tok)
        N = self.max_new_tokens
        names = list(self.drafters)
        wall = {k: 0.0 for k in ["greedy", *names]}
        new = {k: 0 for k in ["greedy", *names]}
        forwards = {k: 0 for k in names}
        nodes = {k: 0 for k in names}
        same = {k: 0 for k in names}
        sources: dict[str, dict[str, float]] = {k: {} for k in names}
        probe = []

        def timed(fn):
            _sync(model)
            t = _clock()
            out = fn()
            _sync(model)
            return out, _clock() - t

        with torch.inference_mode(), treat():
            first = self.inputs[0].to(dev)
            _greedy(model, first, WARMUP_TOKENS, eos, pad)
            opts = {name: {"tree": self.tree} for name in names}
            for name in names:
                _speculative(model, first, name, WARMUP_TOKENS, eos, **opts[name])
            for ids in self.inputs:
                ids = ids.to(dev)
                logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
                probe.append(logits.float().log_softmax(-1).cpu())
                ref, dt = timed(lambda ids=ids: _greedy(model, ids, N, eos, pad))
                ref = ref.cpu()
                wall["greedy"] += dt
                new["greedy"] += ref.shape[1] - ids.shape[1]
                for name in names:
                    out, dt = timed(
                        lambda ids=ids, name=name: _speculative(model, ids, name, N, eos, **opts[name])
                    )
                    seq, stats = out.sequences.cpu(), out.stats
                    wall[name] += dt
                    new[name] += int(stats.new_tokens)
                    forwards[name] += int(stats.forwards)
                    same[name] += int(seq.shape == ref.shape and torch.equal(seq, ref))
                    nodes[name] += int(getattr(stats, "nodes", 0))
                    for src, count in (getattr(stats, "accepted", None) or {}).items():
                        sources[name][str(src)] = sources[name].get(str(src), 0.0) + float(count)
        n = len(self.inputs)
        metrics = {"greedy_tok_s": new["greedy"] / wall["greedy"] if wall["greedy"] else 0.0}
        for name in names:
            metrics[f"mat_{name}"] = new[name] / forwards[name] if forwards[name] else 0.0
            metrics[f"speedup_{name}"] = wall["greedy"] / wall[name] if wall[name] else 0.0
            metrics[f"identical_{name}"] = same[name] / n
            metrics[f"tok_s_{name}"] = new[name] / wall[name] if wall[name] else 0.0
            metrics[f"nodes_{name}"] = nodes[name] / forwards[name] if forwards[name] else 0.0
            total = sum(sources[name].values())
            for src, count in sorted(sources[name].items()) if len(sources[name]) > 1 else ():
                metrics[f"share_{name}_{src}"] = count / total if total else 0.0
        metrics["speedup"] = max(metrics[f"speedup_{k}"] for k in names)
        metrics["identical"] = min(metrics[f"identical_{k}"] for k in names)
        metrics["new_tokens"] = new["greedy"] / n
        return TaskOutput(metrics, torch.stack(probe), n)

    def agreement(self, dense: TaskOutput, pruned: TaskOutput) -> dict[str, float]:
        return next_token_agreement(dense.probe, pruned.probe)


TASKS: dict[str, type[LMTask]] = {"decode-speed": DecodeSpeed}

__all__ = ["TASKS", "DecodeSpeed"]
