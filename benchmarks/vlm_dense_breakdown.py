"""Dense accuracy of the real-parts VLM per question type, split by grid (2x2 / 3x3) and, for
"what is in the <position> cell?", by empty vs item cells (issue 4).

Greedy answers (4 new tokens, fp32 unless ``--dtype bfloat16``) on ``--n`` held-out questions
per type, drawn from the test split with their own seed stream (20 000, apart from the bench's
10 000). Loads the cached model of the chosen recipe (``v6``: the default; ``v4``: the earlier
one); one JSON line per recipe.

Run: ``PYTHONPATH=src python benchmarks/vlm_dense_breakdown.py --recipe v4 v6`` (about 2 minutes
per recipe for 100 questions of each of 3 types on 2 CPU cores; a recipe not yet cached trains first).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from prunekit.bench.tasks.vqa import normalize
from prunekit.zoo.llava_dino_smol import V4, Recipe, llava_dino_smol, pixel_values, prompt_ids
from prunekit.zoo.scenes import SceneMaker, cycle_types

RECIPES = {"v4": V4, "v6": Recipe()}


@torch.inference_mode()
def answers(model, tok, items, batch: int = 8) -> list[str]:
    out = []
    for i in tqdm(range(0, len(items), batch), desc="answering", unit="batch"):
        rows = items[i : i + batch]
        ids = [prompt_ids(tok, qa.question) for _, qa in rows]
        L = max(map(len, ids))
        x = torch.tensor([[tok.pad_token_id] * (L - len(a)) + a for a in ids])
        m = torch.tensor([[0] * (L - len(a)) + [1] * len(a) for a in ids])
        pv = torch.cat([pixel_values(s.images) for s, _ in rows])
        gen = model.generate(input_ids=x, attention_mask=m, pixel_values=pv, max_new_tokens=4,
                             do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        out += tok.batch_decode(gen[:, L:], skip_special_tokens=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", nargs="+", choices=sorted(RECIPES), default=["v6"])
    ap.add_argument("--n", type=int, default=100, help="questions per type")
    ap.add_argument("--types", nargs="+", default=["what", "presence", "single"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="inference dtype")
    args = ap.parse_args()
    items = cycle_types(SceneMaker("test", seed=20_000), args.n * len(args.types), tuple(args.types))
    for name in args.recipe:
        model, tok = llava_dino_smol(getattr(torch, args.dtype), recipe=RECIPES[name])
        acc = defaultdict(list)
        for (s, qa), p in zip(items, answers(model, tok, items), strict=True):
            hit = normalize(p) == normalize(qa.answer)
            grid = math.isqrt(len(s.cells[0]))
            acc[qa.kind].append(hit)
            acc[f"{qa.kind}/{grid}x{grid}"].append(hit)
            if qa.kind == "what":
                acc[f"what/{'empty' if qa.answer == 'nothing' else 'item'}"].append(hit)
            if qa.kind == "presence":
                acc[f"presence/{qa.answer}"].append(hit)
        row = {k: {"acc": round(float(np.mean(v)), 3), "n": len(v)} for k, v in sorted(acc.items())}
        print(json.dumps({"recipe": name, "key": RECIPES[name].key(), "dtype": args.dtype, **row}))


if __name__ == "__main__":
    main()
