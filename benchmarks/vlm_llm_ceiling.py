"""How well can the *frozen* SmolLM2-135M-Instruct answer the scene questions at all?

The evidence behind the real-parts VLM's recipe (issue 4): if the language model cannot answer a
question from a perfect description of the scene, no projector (LLaVA stage 1: only the projector
trained) can make it answer from the image. Two upper bounds, on the held-out questions of the
``vqa-fashion`` task (the same generator and seed):

- ``text``: the image replaced by an exact text description ("Top left: bag. Top right: nothing.
  ..." or "A picture of a bag.");
- ``words``: each of the 256 image slots filled with the input embedding of the word for what lies
  under that patch (" bag", " nothing"): an ideal word-aligned projector.

Answers are scored by choice: the answer (of the question type's allowed answers) with the
highest log-likelihood, so the untuned model's chatty format does not count against it (its
greedy answers are not short: "The answer is no."). Prints one JSON line per mode.

Run: PYTHONPATH=src python benchmarks/vlm_llm_ceiling.py [--limit 100]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from prunekit.bench.tasks.vqa import FashionVQA, score_answers
from prunekit.zoo import smollm2
from prunekit.zoo.llava_dino_smol import IMAGE_TOKEN_ID, _question, _word_targets, patch_words, prompt_ids
from prunekit.zoo.scenes import CLASSES, POSITIONS


def describe(cells) -> str:
    grid = math.isqrt(len(cells))
    if grid == 1:
        return f"A picture of a {CLASSES[cells[0]]}."
    names = ["nothing" if k < 0 else CLASSES[k] for k in cells]
    return " ".join(f"{POSITIONS[grid][i].capitalize()}: {name}." for i, name in enumerate(names))


@torch.inference_mode()
def choose(lm, tok, x: torch.Tensor, choices) -> str:
    """The choice whose tokens (plus the end-of-turn token) are most likely after ``x`` (1, L, d)."""
    embed = lm.get_input_embeddings()
    seqs = [tok(c + "<|im_end|>", add_special_tokens=False).input_ids for c in choices]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    full = torch.cat([x.expand(len(seqs), -1, -1), embed(ids)], dim=1)
    logp = lm(inputs_embeds=full).logits[:, x.shape[1] - 1 : -1].log_softmax(-1)
    tok_lp = logp.gather(2, ids[..., None])[..., 0]
    valid = torch.tensor([[j < len(s) for j in range(width)] for s in seqs])
    return choices[int((tok_lp * valid).sum(1).argmax())]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args()
    lm, tok = smollm2(torch.float32)
    embed = lm.get_input_embeddings()
    words = _word_targets(tok, embed)
    task = FashionVQA(limit=args.limit)
    items = task._samples()
    for mode in ("text", "words"):
        preds = []
        for sample, qa in items:
            if mode == "text":
                head = f"<|im_start|>user\n{describe(sample.cells[0])}\n"
                ids = tok(head, add_special_tokens=False).input_ids + _question(tok, qa.question)
                x = embed(torch.tensor([ids]))
            else:
                ids = torch.tensor([prompt_ids(tok, qa.question)])
                x = embed(ids)
                x[ids == IMAGE_TOKEN_ID] = words[patch_words(sample)[0]]
            preds.append(choose(lm, tok, x, list(qa.choices)))
        scores = score_answers(preds, [q.answer for _, q in items], [q.kind for _, q in items])
        print(json.dumps({"mode": mode, "n": len(items)} | {k: round(v, 3) for k, v in scores.items()}))


if __name__ == "__main__":
    main()
