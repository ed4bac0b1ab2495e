"""Tiny random encoders built from configs: ViT, DeiT (with teacher), DINOv2, CLIP vision, BERT,
and the full CLIP model (text + vision)."""

from __future__ import annotations

import torch
import transformers
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
)

V = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4)


def build(name: str, attn: str = "sdpa", seed: int = 0, **config) -> torch.nn.Module:
    """A tiny random encoder; ``config`` overrides its config (``V`` and the sizes below)."""
    torch.manual_seed(seed)
    if name == "vit":
        cfg = ViTConfig(
            **{**V, "intermediate_size": 64, "image_size": 32, "patch_size": 8, "num_labels": 5, **config}
        )
        model = ViTForImageClassification(cfg)
    elif name == "deit":
        cfg = DeiTConfig(
            **{**V, "intermediate_size": 64, "image_size": 32, "patch_size": 8, "num_labels": 5, **config}
        )
        model = DeiTForImageClassificationWithTeacher(cfg)
    elif name == "dinov2":
        model = Dinov2Model(
            Dinov2Config(**{**V, "mlp_ratio": 2, "image_size": 28, "patch_size": 7, **config})
        )
    elif name == "clip_vision":
        cfg = CLIPVisionConfig(**{**V, "intermediate_size": 64, "image_size": 28, "patch_size": 7, **config})
        model = CLIPVisionModel(cfg)
    elif name == "bert":
        model = BertModel(BertConfig(**{**V, "vocab_size": 100, "intermediate_size": 64, **config}))
    else:
        raise KeyError(name)
    model.set_attn_implementation(attn)
    return model.eval()


ENCODERS = ("vit", "deit", "dinov2", "clip_vision", "bert")


#: every model class the encoder adapters promise to support, with its family
CLASSES = {
    "ViTModel": "vit",
    "ViTForImageClassification": "vit",
    "DeiTModel": "deit",
    "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit",
    "Dinov2Model": "dinov2",
    "Dinov2ForImageClassification": "dinov2",
    "CLIPVisionModel": "clip_vision",
    "CLIPVisionModelWithProjection": "clip_vision",
    "CLIPModel": "clip_vision",
    "CLIPForImageClassification": "clip_vision",
    "BertModel": "bert",
    "BertForSequenceClassification": "bert",
    "BertForMultipleChoice": "bert",
}


def build_clip(seed: int = 0) -> CLIPModel:
    """The full CLIP model; its 28x28 images give 17 vision tokens (CLS + 4x4 patches)."""
    torch.manual_seed(seed)
    text = dict(
        V, intermediate_size=64, vocab_size=100, max_position_embeddings=32, bos_token_id=1, eos_token_id=2
    )
    vision = dict(V, intermediate_size=64, image_size=28, patch_size=7)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def build_class(name: str) -> tuple[torch.nn.Module, str]:
    """A tiny random model of class ``name`` (see :data:`CLASSES`) and its family."""
    fam = CLASSES[name]
    if name.startswith("CLIP") and not name.startswith("CLIPVision"):
        return getattr(transformers, name)(build_clip().config).eval(), fam
    config = type(build(fam).config)
    extra = {
        "vit": dict(intermediate_size=64, image_size=32, patch_size=8),
        "deit": dict(intermediate_size=64, image_size=32, patch_size=8),
        "dinov2": dict(mlp_ratio=2, image_size=28, patch_size=7),
        "clip_vision": dict(intermediate_size=64, image_size=28, patch_size=7),
        "bert": dict(vocab_size=100, intermediate_size=64),
    }[fam]
    return getattr(transformers, name)(config(**V, **extra)).eval(), fam


def inputs(name: str, model, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "bert":
        ids = torch.randint(3, 100, (batch, 12), generator=g)
        am = torch.ones_like(ids)
        am[1:, 9:] = 0  # the second row is padded
        return dict(input_ids=ids, attention_mask=am)
    S = model.config.image_size
    return dict(pixel_values=torch.randn(batch, 3, S, S, generator=g))


def output(out) -> torch.Tensor:
    """The head output a user reads: logits, else the pooled CLS output."""
    return out.logits if getattr(out, "logits", None) is not None else out.pooler_output
