"""Tiny random Hugging Face models built from configs (the classes users load), and their inputs."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

TXT = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CLIP_V = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=56,
    patch_size=14,
)  # 4x4 = 16 patches (+CLS)
IMG = 255
QTXT = dict(TXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
Q_IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)


def _seeded(fn):
    def build(attn: str = "sdpa", seed: int = 0, **text):
        """``text``: overrides of the language model's config (heads, depth, ...; see ``TXT``)."""
        torch.manual_seed(seed)
        return fn(attn, **text).eval()

    build.__name__ = fn.__name__
    return build


@_seeded
def llama(attn, **text):
    return LlamaForCausalLM(LlamaConfig(**{**TXT, **text}, attn_implementation=attn))


@_seeded
def qwen2(attn, **text):
    return Qwen2ForCausalLM(Qwen2Config(**{**TXT, **text}, attn_implementation=attn))


@_seeded
def mistral(attn, **text):
    return MistralForCausalLM(MistralConfig(**{**TXT, **text}, sliding_window=None, attn_implementation=attn))


@_seeded
def llava(attn, **text):
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_V),
        text_config=LlamaConfig(**{**TXT, **text}),
        image_token_id=IMG,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation=attn,
    )
    return LlavaForConditionalGeneration(cfg)


@_seeded
def llava_next(attn, **text):
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**CLIP_V),
        text_config=LlamaConfig(**{**TXT, **text}),
        image_token_id=IMG,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]],
        attn_implementation=attn,
    )
    return LlavaNextForConditionalGeneration(cfg)


@_seeded
def qwen2_vl(attn, **text):
    cfg = Qwen2VLConfig(
        text_config={**QTXT, **text},
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **Q_IDS,
        attn_implementation=attn,
    )
    return Qwen2VLForConditionalGeneration(cfg)


@_seeded
def qwen2_5_vl(attn, **text):
    cfg = Qwen2_5_VLConfig(
        text_config={**QTXT, **text},
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        **Q_IDS,
        attn_implementation=attn,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg)


def gemma3(attn: str, layer_types: list[str]):
    """A tiny Gemma-3 with a sliding window of 8 and the given layer types (4 layers)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, layer_types=layer_types,
    )  # fmt: skip
    cfg._attn_implementation = attn
    return Gemma3ForCausalLM(cfg).eval()


DECODERS = {"llama": llama, "qwen2": qwen2, "mistral": mistral}
VLMS = {"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl}


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, am


def text_inputs(batch: int = 1, length: int = 20, seed: int = 0) -> dict:
    """Prompts of different lengths (row b is 3*b tokens shorter), left-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1, *torch.randint(3, 200, (length - 1 - 3 * b,), generator=g).tolist()] for b in range(batch)]
    ids, am = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=am)


def vlm_inputs(name: str, model, batch: int = 1, seed: int = 0) -> dict:
    """One image per sample, text before and after it; rows get shorter prefixes (left-padded)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    rows, extra = [], {}
    if name in ("llava", "llava_next"):
        vc = cfg.vision_config
        S = vc.image_size
        if name == "llava":
            pv = torch.randn(batch, 3, S, S, generator=g)
            n_img = [(S // vc.patch_size) ** 2] * batch
        else:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            sizes = torch.tensor(
                [[56, 112], [112, 56], [112, 112]][:batch] if batch <= 3 else [[56, 112]] * batch
            )
            n_crops = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, S) for s in sizes]
            pv = torch.randn(batch, max(n_crops), 3, S, S, generator=g)
            feats = model.model.get_image_features(
                pixel_values=pv, image_sizes=sizes, return_dict=True
            ).pooler_output
            n_img = [f.shape[0] for f in feats]
            extra["image_sizes"] = sizes
        for b in range(batch):
            pre = torch.randint(3, 200, (4 - b % 3,), generator=g).tolist()
            post = torch.randint(3, 200, (5,), generator=g).tolist()
            rows.append([1, *pre, *[IMG] * n_img[b], *post])
        ids, am = _left_pad(rows)
        return dict(input_ids=ids, attention_mask=am, pixel_values=pv, **extra)
    vc = cfg.vision_config
    h, w = 4, 8
    n_img = h * w // vc.spatial_merge_size**2
    pv = torch.randn(batch * h * w, 3 * vc.temporal_patch_size * vc.patch_size**2, generator=g)
    for b in range(batch):
        pre = torch.randint(3, 200, (3 - b % 3,), generator=g).tolist()
        post = torch.randint(3, 200, (5,), generator=g).tolist()
        rows.append(
            [
                1,
                *pre,
                cfg.vision_start_token_id,
                *[cfg.image_token_id] * n_img,
                cfg.vision_end_token_id,
                *post,
            ]
        )
    ids, am = _left_pad(rows)
    return dict(
        input_ids=ids,
        attention_mask=am,
        pixel_values=pv,
        image_grid_thw=torch.tensor([[1, h, w]] * batch),
        mm_token_type_ids=(ids == cfg.image_token_id).int(),
    )


def reset(model) -> None:
    """Qwen2-VL caches ``rope_deltas`` between calls: clear it between unrelated prompts."""
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None


def qwen_image_inputs(
    model, grids: list[list[tuple[int, int]]], seed: int = 0, frames_like: bool = False
) -> dict:
    """Qwen2-VL / 2.5-VL prompts holding ``grids[b]`` images each, image ``(h, w)`` in patches
    (left-padded rows). ``frames_like``: a sample's images are small perturbations of its first
    one (frames of a near-static video)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vc = cfg.vision_config
    m2 = vc.spatial_merge_size**2
    dim = 3 * vc.temporal_patch_size * vc.patch_size**2
    rows, pv, thw = [], [], []
    for b, images in enumerate(grids):
        row = [1, *torch.randint(3, 200, (3 - b % 3,), generator=g).tolist()]
        first = None
        for h, w in images:
            x = torch.randn(h * w, dim, generator=g)
            if frames_like and first is not None and first.shape == x.shape:
                x = first + 0.05 * x
            first = x if first is None else first
            pv.append(x)
            thw.append([1, h, w])
            row += [cfg.vision_start_token_id, *[cfg.image_token_id] * (h * w // m2), cfg.vision_end_token_id]
        rows.append(row + torch.randint(3, 200, (5,), generator=g).tolist())
    ids, am = _left_pad(rows)
    return dict(
        input_ids=ids,
        attention_mask=am,
        pixel_values=torch.cat(pv),
        image_grid_thw=torch.tensor(thw),
        mm_token_type_ids=(ids == cfg.image_token_id).int(),
    )


def pad_answers(features: list[dict]) -> dict:
    """Right-pad prompt -> answer samples (lists ``input_ids`` and ``labels``): pad id 0, labels -100,
    attention mask 0 on the padding."""
    L = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (L - len(f["input_ids"])) for f in features])
    lab = torch.tensor([f["labels"] + [-100] * (L - len(f["labels"])) for f in features])
    att = torch.tensor([[1] * len(f["input_ids"]) + [0] * (L - len(f["input_ids"])) for f in features])
    return {"input_ids": ids, "labels": lab, "attention_mask": att}
