"""prunekit's KV-cache compression side by side with NVIDIA's kvpress on SmolLM2-135M-Instruct (fp32,
SDPA): StreamingLLM, SnapKV and PyramidKV after a prefill of the same Wikipedia prompt, keeping
50 %, 25 % and 10 % of the cache.

For each (method, budget) it reports how often the kept entries agree (per layer and KV head, the
share of kvpress's kept positions that prunekit keeps too; mean and worst layer), the entries each
side keeps, and each library's compression time (the wall time of its scoring, selection and
gather over all layers of one prefill, median of ``--repeats``).

kvpress 0.5.5 pins transformers < 5.3, so it runs in its own environment and the two sides talk
through files under ``--out-dir``: ``ids.safetensors`` (the prompt's token ids) and
``peer.safetensors`` / ``peer.json`` (kvpress's kept positions per layer, its budgets and times).
The peer imports only torch, transformers, safetensors and kvpress, and loads the same checkpoint
(prunekit's cached SmolLM2 conversion).

How the peer's kept positions are read: kvpress's ``ScorerPress.compress`` keeps
``scores.topk(n_kept)`` with ``n_kept = compute_n_kept(k_len, ratio)`` (``PyramidKVPress``:
``get_layer_budget``); the peer wraps the press's ``score`` and repeats that same call on the
scores it returned. Budgets: kvpress floors ``k_len * (1 - ratio)`` (``int(1000 * 0.1)`` is 99),
prunekit rounds a fraction, so the prunekit side is given kvpress's count for StreamingLLM and
SnapKV; PyramidKV takes the fraction on both sides (its per-layer budgets come from it).

Set up the peer environment once:

    python3 -m venv /work/kvpress-venv
    /work/kvpress-venv/bin/pip install torch==2.13.0
    /work/kvpress-venv/bin/pip install "transformers>=5.0,<5.3" kvpress==0.5.5

Run: PYTHONPATH=src .venv/bin/python benchmarks/kvpress_side_by_side.py --role all
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import time

import torch

RATIOS = (0.5, 0.75, 0.9)  # kvpress's compression_ratio: the fraction removed
METHODS = ("streamingllm", "snapkv", "pyramidkv")


# ------------------------------------------------------------------ peer (kvpress environment)
def peer(out: pathlib.Path, repeats: int) -> None:
    from kvpress import PyramidKVPress, SnapKVPress, StreamingLLMPress
    from kvpress.utils import compute_n_kept
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, DynamicCache

    meta = json.loads((out / "ids.json").read_text())
    ids = load_file(out / "ids.safetensors")["ids"]
    model = AutoModelForCausalLM.from_pretrained(
        meta["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    presses = {
        "streamingllm": lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4),
        "snapkv": lambda r: SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5),
        "pyramidkv": lambda r: PyramidKVPress(compression_ratio=r, window_size=64, kernel_size=5, beta=20),
    }
    tensors, rows = {}, []
    for name, make in presses.items():
        for r in RATIOS:
            press = make(r)
            kept: dict[int, torch.Tensor] = {}
            score, compress = press.score, press.compress
            spent = [0.0]

            def scored(module, hidden, keys, values, attn, kwargs, press=press, kept=kept, score=score):
                s = score(module, hidden, keys, values, attn, kwargs)
                k_len = keys.shape[2]
                n = press.get_layer_budget(module, k_len) if hasattr(press, "get_layer_budget") else (
                    compute_n_kept(k_len, press.compression_ratio))  # fmt: skip
                kept[module.layer_idx] = s.topk(n, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, n)
                return s

            def timed(*a, compress=compress, spent=spent, **k):
                t = time.perf_counter()
                out_ = compress(*a, **k)
                spent[0] += time.perf_counter() - t
                return out_

            press.score, press.compress = scored, timed
            times = []
            with torch.inference_mode():
                for _ in range(repeats):
                    spent[0] = 0.0
                    with press(model):
                        model(
                            input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True
                        )
                    times.append(spent[0])
            for layer, idx in kept.items():
                tensors[f"{name}/{r}/{layer}"] = idx.contiguous()
            rows.append({"method": name, "ratio": r, "seconds": statistics.median(times), "times": times,
                         "kept_per_layer": [int(kept[i].shape[-1]) for i in sorted(kept)]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    import kvpress
    import transformers

    save_file(tensors, out / "peer.safetensors")
    versions = {"kvpress": getattr(kvpress, "__version__", "0.5.5"), "transformers": transformers.__version__}
    (out / "peer.json").write_text(json.dumps({**versions, "rows": rows}))


# ------------------------------------------------------------------ prunekit side
def make_ids(out: pathlib.Path, n_tokens: int) -> None:
    from safetensors.torch import save_file

    from prunekit import zoo
    from prunekit.assets import cache_dir, wiki_text

    _, tok = zoo.smollm2(torch.float32)  # converts and caches the checkpoint on first use
    ids = torch.tensor(tok(wiki_text(), add_special_tokens=False).input_ids[:n_tokens])[None]
    out.mkdir(parents=True, exist_ok=True)
    save_file({"ids": ids}, out / "ids.safetensors")
    (out / "ids.json").write_text(
        json.dumps({"model": str(cache_dir("smollm2-135m-instruct")), "tokens": n_tokens})
    )


def ours(out: pathlib.Path, repeats: int, md: pathlib.Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import prunekit

    meta = json.loads((out / "ids.json").read_text())
    ids = load_file(out / "ids.safetensors")["ids"]
    theirs = load_file(out / "peer.safetensors")
    peer_rows = {(r["method"], r["ratio"]): r for r in json.loads((out / "peer.json").read_text())["rows"]}
    peer_meta = json.loads((out / "peer.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(
        meta["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    n_layers = model.config.num_hidden_layers
    rows = []
    for name in METHODS:
        for r in RATIOS:
            pr = peer_rows[(name, r)]
            keep = 1 - r if name == "pyramidkv" else pr["kept_per_layer"][0]
            options = {"n_sink": 4} if name == "streamingllm" else {"window": 64, "kernel": 5}
            if name == "pyramidkv":
                options["beta"] = 20.0
            times = []
            with torch.inference_mode():
                for _ in range(repeats):
                    with prunekit.compress_kv(model, name, keep=keep, **options) as s:
                        model(input_ids=ids, use_cache=True)
                    times.append(s.stats.compress_seconds)
            agree, sizes = [], []
            for layer in range(n_layers):
                pos, valid = s.stats.kept[0][layer]  # (B, Hkv, K) original positions, validity
                mine = pos[0]
                other = theirs[f"{name}/{r}/{layer}"][0]  # (Hkv, n)
                sizes.append((int(valid[0, 0].sum()), other.shape[-1]))
                hit = torch.zeros(mine.shape[0])
                for h in range(mine.shape[0]):  # a handful of KV heads
                    a = set(mine[h][valid[0, h]].tolist())
                    hit[h] = len(a & set(other[h].tolist())) / max(1, other.shape[-1])
                agree.append(hit.mean().item())
            row = {"method": name, "kept_fraction": 1 - r, "agreement": sum(agree) / len(agree),
                   "worst_layer": min(range(n_layers), key=lambda i: agree[i]), "worst": min(agree),
                   "same_budgets": all(a == b for a, b in sizes), "entries_pk": sum(a for a, _ in sizes),
                   "entries_kvpress": sum(b for _, b in sizes), "seconds_pk": statistics.median(times),
                   "seconds_kvpress": pr["seconds"]}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "side_by_side.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = (
        f"SmolLM2-135M-Instruct fp32, SDPA, one prompt of {ids.shape[1]} Wikipedia tokens; kvpress "
        f"{peer_meta['kvpress']} (transformers {peer_meta['transformers']}) vs prunekit "
        f"{prunekit.__version__}; agreement = share of kvpress's kept positions prunekit keeps too, per "
        f"layer and KV head; time = compression over all {n_layers} layers of one prefill, median of "
        f"{repeats}.\n\n"
        "| method | cache kept | agreement (mean) | worst layer | same per-layer budgets "
        "| entries pk / kvpress | time pk (ms) | time kvpress (ms) |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['method']} | {r['kept_fraction']:.0%} | {r['agreement']:.4f} "
        f"| {r['worst_layer']} ({r['worst']:.4f}) "
        f"| {'yes' if r['same_budgets'] else 'no'} | {r['entries_pk']} / {r['entries_kvpress']} "
        f"| {1000 * r['seconds_pk']:.1f} | {1000 * r['seconds_kvpress']:.1f} |"
        for r in rows
    ]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(head + "\n".join(lines) + "\n")
    print(md.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["all", "ids", "peer", "prunekit"], default="all")
    p.add_argument("--out-dir", default="runs/kvpress")
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peer-python", default="/work/kvpress-venv/bin/python")
    p.add_argument("--md", default="benchmarks/results/kv_side_by_side.md")
    a = p.parse_args()
    out = pathlib.Path(a.out_dir)
    if a.role in ("all", "ids"):
        make_ids(out, a.tokens)
    if a.role == "peer":
        peer(out, a.repeats)
    if a.role == "all":
        cmd = [a.peer_python, __file__, "--role", "peer", "--out-dir", str(out), "--repeats", str(a.repeats)]
        subprocess.run(cmd, check=True)
    if a.role in ("all", "prunekit"):
        ours(out, a.repeats, pathlib.Path(a.md))


if __name__ == "__main__":
    main()
