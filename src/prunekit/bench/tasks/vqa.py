"""VLM task: questions about held-out Fashion-MNIST scenes (:mod:`prunekit.zoo.scenes`), answered
by greedy generation with the method active, scored by exact match of the short answer.

``vqa-fashion`` asks the single-image question types in equal numbers (what is at a position, is
there an X, how many Xs, which is further left, what is this); ``vqa-fashion-multi`` puts two
scenes in one prompt ("which image has an X?"); ``vqa-fashion-video`` shows four frames of a
scene in which one item may move ("where is the X in the last frame?", "does the X move?").
Agreement with dense compares the next-token distribution at the first answer token.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..models import Loaded
from .base import Task, TaskOutput, Treat, next_token_agreement

MAX_NEW = 5


def normalize(text: str) -> str:
    """The first line of an answer, lower-cased, without surrounding spaces and final punctuation."""
    return text.strip().split("\n")[0].strip().strip(".!").strip().lower()


def score_answers(pred: list[str], gold: list[str], kinds: list[str]) -> dict[str, float]:
    """``acc`` over all questions and ``acc_<kind>`` per question type (exact match after normalising)."""
    hit = np.array([normalize(p) == normalize(g) for p, g in zip(pred, gold, strict=True)], dtype=float)
    out = {"acc": float(hit.mean()) if len(hit) else float("nan")}
    for k in sorted(set(kinds)):
        sel = np.array([x == k for x in kinds])
        out[f"acc_{k}"] = float(hit[sel].mean())
    return out


class FashionVQA(Task):
    name = "vqa-fashion"
    kind = "vlm"
    primary = "acc"
    default_limit = 200
    summary = "questions on held-out Fashion-MNIST scenes (position, presence, count, left-of, single item)"
    variant = "single"
    batch = 8
    timing_batch = 2  # prompts in the timed prefill / generate batch (each row times ~20 prefills)
    decode_tokens = 4

    def _samples(self):
        from ...zoo.scenes import SceneMaker, cycle_types

        maker = SceneMaker("test", seed=10_000 + self.seed)  # held-out split, its own seed stream
        if self.variant == "multi":
            return [(s, s.qas[0]) for s in (maker.multi() for _ in range(self.limit))]
        if self.variant == "video":
            return [(s, s.qas[i % 2]) for i, s in enumerate(maker.video() for _ in range(self.limit))]
        return cycle_types(maker, self.limit)

    def prepare(self, loaded: Loaded) -> None:
        if self.prepared_for == loaded.name:
            return
        from ...zoo import pixel_values, prompt_ids

        tok = loaded.tokenizer
        self.items = self._samples()
        self.prompts = [prompt_ids(tok, qa.question, len(s.images)) for s, qa in self.items]
        self.pixels = [pixel_values(s.images) for s, _ in self.items]
        self.gold = [qa.answer for _, qa in self.items]
        self.kinds = [qa.kind for _, qa in self.items]
        self.chance = float(np.mean([1 / len(qa.choices) for _, qa in self.items]))
        self.prepared_for = loaded.name

    def _inputs(self, loaded: Loaded, rows: list[int]) -> dict:
        from .lm import _pad_id, left_padded

        model = loaded.model
        dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        ids, mask = left_padded([self.prompts[i] for i in rows], _pad_id(loaded.tokenizer), dev)
        pv = torch.cat([self.pixels[i] for i in rows]).to(dev, dtype)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        from .lm import _pad_id

        model, tok = loaded.model, loaded.tokenizer
        preds, firsts, kept, seen = [], [], 0, 0
        for start in range(0, len(self.items), self.batch):
            rows = list(range(start, min(start + self.batch, len(self.items))))
            inputs = self._inputs(loaded, rows)
            with torch.inference_mode(), treat() as session:
                gen = model.generate(
                    **inputs, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=_pad_id(tok),
                    output_scores=True, return_dict_in_generate=True,
                )  # fmt: skip
            if session is not None:
                kept += session.stats.tokens_kept
                seen += session.stats.tokens_in
            new = gen.sequences[:, inputs["input_ids"].shape[1] :]
            preds += tok.batch_decode(new, skip_special_tokens=True)
            firsts.append(gen.scores[0].float().log_softmax(-1).cpu())
        metrics = score_answers(preds, self.gold, self.kinds) | {"chance": self.chance}
        return TaskOutput(metrics, torch.cat(firsts), n=len(preds),
                          tokens_kept=kept / seen if seen else None, extra={"pred": preds})  # fmt: skip

    def agreement(self, dense: TaskOutput, pruned: TaskOutput) -> dict[str, float]:
        same = np.mean(
            [
                normalize(a) == normalize(b)
                for a, b in zip(dense.extra["pred"], pruned.extra["pred"], strict=True)
            ]
        )
        return next_token_agreement(dense.probe, pruned.probe) | {"answer_agree": float(same)}

    def timing(self, loaded: Loaded) -> dict[str, Callable[[Treat], object]]:
        """``prefill``: a batch of prompts with their images (vision tower included)."""
        from .lm import _pad_id

        model = loaded.model
        self.timed_batch = min(self.timing_batch, len(self.items))
        inputs = self._inputs(loaded, list(range(self.timed_batch)))

        def run_prefill(treat: Treat):
            with torch.inference_mode(), treat():
                return model(**inputs, logits_to_keep=1)

        def run_generate(treat: Treat, n: int):
            with torch.inference_mode(), treat():
                return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=_pad_id(loaded.tokenizer))  # fmt: skip

        return {
            "prefill": run_prefill,
            "generate_short": lambda t: run_generate(t, 1),
            "generate_long": lambda t: run_generate(t, 1 + self.decode_tokens),
        }


class FashionVQAMulti(FashionVQA):
    name = "vqa-fashion-multi"
    summary = "two Fashion-MNIST scenes in one prompt: which image has an X?"
    variant = "multi"
    default_limit = 100


class FashionVQAVideo(FashionVQA):
    name = "vqa-fashion-video"
    summary = "four frames of a scene, one item may move: where is it at the end, does it move?"
    variant = "video"
    default_limit = 100
    batch = 4
    timing_batch = 4


TASKS = {t.name: t for t in (FashionVQA, FashionVQAMulti, FashionVQAVideo)}
