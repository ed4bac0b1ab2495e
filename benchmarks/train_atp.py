"""Train ATP-LLaVA's threshold modules on the real-parts VLM for the bench's budgets.

Writes ``benchmarks/results/atp_llava_dino_smol.safetensors`` (one module per budget, read by
``benchmarks/vlm_methods.yaml``) and ``atp_llava_dino_smol.jsonl`` (the training log).
Run: ``PYTHONPATH=src python benchmarks/train_atp.py`` (about 10 minutes on 2 CPU cores).
The scenes come from the training split; the bench asks held-out ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prunekit.tokens.methods.atp_llava import save_atp
from prunekit.training.atp import train_atp
from prunekit.zoo.llava_dino_smol import answer_batches, llava_dino_smol

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=int, nargs="+", default=[28, 56, 85], help="mean visual tokens per layer")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 10, 20], help="cut layers (as the bench's)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lambda-atp", type=float, default=0.05, help="weight of the deeper-layer token cost")
    ap.add_argument("--lambda-target", type=float, default=0.2, help="weight of |mean kept - target|")
    ap.add_argument("--out", type=Path, default=OUT / "atp_llava_dino_smol.safetensors")
    args = ap.parse_args()
    model, tok = llava_dino_smol()
    model.set_attn_implementation("sdpa")
    batches = answer_batches(tok, args.steps, batch=args.batch, seed=7)
    t0 = time.time()
    modules = train_atp(model, batches, args.keep, layers=tuple(args.layers), steps=args.steps,
                        lambda_atp=args.lambda_atp, lambda_target=args.lambda_target)  # fmt: skip
    seconds = time.time() - t0
    save_atp(modules, args.out)
    with open(args.out.with_suffix(".jsonl"), "w") as f:
        for k, m in zip(args.keep, modules, strict=True):
            f.write(json.dumps({"keep": k, "layers": args.layers, "train_s": round(seconds / len(modules)),
                                "lambda_atp": args.lambda_atp, "lambda_target": args.lambda_target,
                                "log": m.log}) + "\n")  # fmt: skip
    print(f"wrote {args.out} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
