"""Real models that load offline: the packaged pretrained parts and the VLM built from them.

from prunekit import zoo
model, tok = zoo.llava_dino_smol()   # LlavaForConditionalGeneration: DINOv2-S + SmolLM2-135M
model, tok = zoo.smollm2()           # LlamaForCausalLM
vit = zoo.dinov2_small()             # Dinov2Model
enc, tok = zoo.minilm()              # BertModel
"""

from __future__ import annotations

from ..models.zoo import dinov2_small, minilm, smollm2
from .llava_dino_smol import IMAGE_TOKEN_ID, N_VISUAL, V4, Recipe, llava_dino_smol, pixel_values, prompt_ids

__all__ = [
    "IMAGE_TOKEN_ID", "N_VISUAL", "V4", "Recipe", "dinov2_small", "llava_dino_smol", "minilm", "pixel_values",
    "prompt_ids", "smollm2",
]  # fmt: skip
