"""lm-evaluation-harness adapter: evaluate a model with a prunekit method active.

    import lm_eval
    from prunekit.bench.harness import PrunedLM

    lm = PrunedLM(model, tokenizer, method="fastv", keep=0.5, layer=2)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

or from the command line (the class registers itself as ``prunekit`` when this module is
imported, e.g. through ``--include_path`` plus a ``import prunekit.bench.harness`` in a wrapper):
``lm_eval --model prunekit --model_args pretrained=HuggingFaceTB/SmolLM2-135M,method=fastv,keep=0.5``.

Why not ``HFLM``: it scores a continuation by one forward over context + continuation and slices
the last logits, but a prompt-token method drops positions from that forward, so the slice would
silently read the wrong logits. Here the context is prefilled with the method active and the
continuation is fed with the cache (``prunekit.bench.tasks.lm.score_pairs``), exactly as the
bench scores its own tasks. ``loglikelihood_rolling`` (perplexity) scores every position and is
refused for token and KV methods; ``generate_until`` runs ``generate()`` with the method active.

lmms-eval follows the same pattern: subclass its ``lmms`` model, open
``Treatment(...).opener(model, "vision")`` around each ``generate`` / log-likelihood call, and
feed continuations after a prefill, not in one forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the lm-eval adapter needs lm-evaluation-harness: pip install 'prunekit[lmeval]'"
    ) from e

from .models import Loaded, load
from .tasks.base import NotApplicableError
from .tasks.lm import Pair, _pad_id, encode_pairs, score_pairs
from .treatments import Treatment


@register_model("prunekit")
class PrunedLM(LM):
    """A Hugging Face causal LM under a prunekit treatment, as an lm-eval ``LM``."""

    def __init__(
        self,
        model,
        tokenizer,
        method: str = "dense",
        keep: int | float = 1.0,
        *,
        max_length: int | None = None,
        **options,
    ) -> None:
        super().__init__()
        tokenizer.padding_side = "left"
        self.loaded = Loaded(getattr(model.config, "name_or_path", "model"), "lm", model, tokenizer)
        self.treatment = Treatment(method, keep, options)
        self.treatment.validate()
        self.open = self.treatment.opener(model, "llm")
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
        self.sessions: list = []  # stats of every session opened (tokens kept, select time)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> PrunedLM:
        kw = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        pretrained = kw.pop("pretrained", "smollm2")
        loaded = load(pretrained, kw.pop("dtype", "auto"), kw.pop("device", "cpu"))
        method, keep = kw.pop("method", "dense"), kw.pop("keep", "1.0")
        keep_v = float(keep) if "." in keep else int(keep)
        opts = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in kw.items()}
        return cls(loaded.model, loaded.tokenizer, method, keep_v, **opts)

    @contextmanager
    def _tracked(self):
        with self.open() as session:
            yield session
        if session is not None:
            self.sessions.append(session.stats)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = encode_pairs(self.loaded.tokenizer, [r.args[:2] for r in requests], self.max_length)
        s = score_pairs(self.loaded, pairs, self._tracked)
        return [(float(lp), bool(g)) for lp, g in zip(s["logprob"], s["greedy"], strict=True)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if self.treatment.family in ("tokens", "kv"):
            raise NotApplicableError(
                f"loglikelihood_rolling scores every position; {self.treatment.method!r} is a "
                f"{self.treatment.family} method, which drops or compresses positions"
            )
        tok = self.loaded.tokenizer
        out = []
        w = self.max_length - 1
        for r in requests:
            ids = tok(r.args[0], add_special_tokens=False).input_ids
            pairs = [
                Pair(ids[i - 1 : i] if i else [_pad_id(tok)], ids[i : i + w]) for i in range(0, len(ids), w)
            ]
            s = score_pairs(self.loaded, pairs, self._tracked)
            out.append(float(s["logprob"].sum()))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        model, tok = self.loaded.model, self.loaded.tokenizer
        dev = next(model.parameters()).device
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1]) if len(r.args) > 1 else {}
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.pop("max_gen_toks", 64))
            enc = tok(context, return_tensors="pt", add_special_tokens=False).to(dev)
            with torch.inference_mode(), self._tracked():
                gen = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=_pad_id(tok))
            text = tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
