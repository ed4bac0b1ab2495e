"""The models a bench run can name: the real packaged ones, and tiny random ones for smoke tests.

A user with hub access benchmarks any supported checkpoint by its hub id or a local folder
(``--model org/name``): ``AutoModelForCausalLM`` for decoders, ``AutoModel`` for encoders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("lm", "vit", "text-encoder", "vlm")


@dataclass
class Loaded:
    """A model ready to bench: ``kind`` says which tasks fit it (``lm``, ``vit``, ``text-encoder``)."""

    name: str
    kind: str
    model: nn.Module
    tokenizer: object | None = None


def _smollm2(dtype: torch.dtype) -> Loaded:
    from .. import zoo

    model, tok = zoo.smollm2(dtype=dtype)
    return Loaded("smollm2", "lm", model, tok)


def _smollm2_moe(dtype: torch.dtype) -> Loaded:
    """SmolLM2-135M MoEfied into a Mixtral (16 experts of 96 channels per layer; built on first use)."""
    from ..zoo import smollm2_moe

    model, tok = smollm2_moe(dtype)
    # on a CPU the experts' eager loop runs about 1.7x faster than grouped_mm's fallback (measured on
    # this model, one 512-token prefill); on CUDA call model.set_experts_implementation("grouped_mm")
    model.set_experts_implementation("eager")
    return Loaded("smollm2-moe", "lm", model, tok)


def _gemma3(dtype: torch.dtype) -> Loaded:
    """Gemma-3-270M base (optional asset; see ``prunekit.zoo.gemma3``)."""
    from .. import zoo

    model, tok = zoo.gemma3(dtype=dtype)
    return Loaded("gemma3-270m", "lm", model, tok)


def _dinov2(dtype: torch.dtype) -> Loaded:
    from .. import zoo

    return Loaded("dinov2-s", "vit", zoo.dinov2_small(dtype=dtype))


def _minilm(dtype: torch.dtype) -> Loaded:
    from .. import zoo

    model, tok = zoo.minilm()
    return Loaded("minilm", "text-encoder", model.to(dtype), tok)


def _llava_dino_smol(dtype: torch.dtype) -> Loaded:
    """The real-parts VLM (DINOv2-S + SmolLM2-135M, trained projector and LoRA; trained on first use)."""
    from ..zoo import llava_dino_smol

    model, tok = llava_dino_smol(dtype)
    return Loaded("llava-dino-smol", "vlm", model, tok)


def _tiny_llama(dtype: torch.dtype) -> Loaded:
    """A 2-layer random Llama with SmolLM2's tokenizer: mechanics only, its quality means nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .. import zoo

    _, tok = zoo.smollm2()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        tie_word_embeddings=True,
    )  # fmt: skip
    return Loaded("tiny-llama", "lm", LlamaForCausalLM(cfg).to(dtype).eval(), tok)


def _tiny_llava(dtype: torch.dtype) -> Loaded:
    """The real-parts VLM's layout (LLaVA, DINOv2 tower, Llama LM, SmolLM2 tokenizer), tiny and random."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from .. import zoo
    from ..zoo.llava_dino_smol import IMAGE_TOKEN_ID, N_VISUAL

    _, tok = zoo.smollm2()
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=14
        ).to_dict(),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ).to_dict(),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=N_VISUAL,
        projector_hidden_act="gelu",
    )
    return Loaded("tiny-llava", "vlm", LlavaForConditionalGeneration(cfg).to(dtype).eval(), tok)


def _tiny_vit(dtype: torch.dtype) -> Loaded:
    """A 4-layer random DINOv2 (patch 14, 224 px): mechanics only."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        image_size=224, patch_size=14,
    )  # fmt: skip
    return Loaded("tiny-vit", "vit", Dinov2Model(cfg).to(dtype).eval())


def _tiny_bert(dtype: torch.dtype) -> Loaded:
    """A 2-layer random BERT with MiniLM's tokenizer: mechanics only."""
    from transformers import BertConfig, BertModel

    from .. import zoo

    _, tok = zoo.minilm()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    return Loaded("tiny-bert", "text-encoder", BertModel(cfg).to(dtype).eval(), tok)


BUILTIN: dict[str, Callable[[torch.dtype], Loaded]] = {
    "smollm2": _smollm2,
    "smollm2-moe": _smollm2_moe,
    "gemma3-270m": _gemma3,
    "dinov2-s": _dinov2,
    "minilm": _minilm,
    "llava-dino-smol": _llava_dino_smol,
    "tiny-llama": _tiny_llama,
    "tiny-llava": _tiny_llava,
    "tiny-vit": _tiny_vit,
    "tiny-bert": _tiny_bert,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: models that run in bf16 under ``dtype="auto"`` where the hardware computes bf16 natively
PREFERS_BF16 = {"smollm2", "smollm2-moe", "llava-dino-smol"}


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it torch emulates
    bf16 and is many times slower than fp32 (seen: 15 s vs 1 s for one SmolLM2 prefill on AVX2)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, dtype: str, device: str = "cpu") -> str:
    """``auto``: bf16 for the LMs on CUDA or on CPUs with native bf16 (about 4x faster than fp32
    there), else fp32; any other value is checked and returned."""
    if dtype == "auto":
        native = device.startswith("cuda") or cpu_has_bf16()
        return "bfloat16" if name in PREFERS_BF16 and native else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {['auto', *DTYPES]}")
    return dtype


def _from_hub(name: str, dtype: torch.dtype) -> Loaded:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(name)
    mt = getattr(cfg, "model_type", "")
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"model {name!r}: encoder-decoder models are not benchmarked")
    if mt in ("vit", "deit", "dinov2", "clip_vision_model"):
        return Loaded(name, "vit", AutoModel.from_pretrained(name, dtype=dtype).eval())
    if mt in ("bert",):
        return Loaded(name, "text-encoder", AutoModel.from_pretrained(name, dtype=dtype).eval(),
                      AutoTokenizer.from_pretrained(name))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval()
    return Loaded(name, "lm", model, AutoTokenizer.from_pretrained(name))


def load(name: str, dtype: str = "float32", device: str = "cpu") -> Loaded:
    """A bench model by built-in name (``smollm2``, ``dinov2-s``, ``minilm``, ``tiny-*``) or hub id."""
    dtype = resolve_dtype(name, dtype, device)
    if name in BUILTIN:
        loaded = BUILTIN[name](DTYPES[dtype])
    elif "/" in name:
        loaded = _from_hub(name, DTYPES[dtype])
    else:
        raise ValueError(
            f"unknown model {name!r}; built-in: {sorted(BUILTIN)}, or a hub id / local folder 'org/name'"
        )
    loaded.model.to(device)
    if loaded.tokenizer is not None and loaded.kind in ("lm", "vlm"):
        loaded.tokenizer.padding_side = "left"
    return loaded
