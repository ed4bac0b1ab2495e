"""A real, small vision-language model from packaged parts: ``LlavaForConditionalGeneration``
with the real DINOv2-S/14 as vision tower and the real SmolLM2-135M-Instruct as language model,
joined by a LLaVA-style 2-layer MLP projector (Linear-GELU-Linear).

The vision tower is frozen. The projector is trained, and (``Recipe.lora_rank > 0``, the default)
so are rank-16 LoRA adapters on the LLM's linear layers, merged into its weights on loading:
LLaVA stage 2 in miniature. Projector-only training (LLaVA stage 1, ``lora_rank=0``) was the
first recipe; the frozen 135M LLM cannot answer most of these questions even from a perfect text
description of the scene (``benchmarks/vlm_llm_ceiling.py``), so the adapters teach it to read
the image. Training runs on Fashion-MNIST scenes (:mod:`prunekit.zoo.scenes`) with templated
questions, on CPU, deterministically under a seed: the frozen vision features are computed once
(see :class:`Recipe`: word alignment, then one-item recognition, then grid scenes; the word
regression stays on as an auxiliary loss, which keeps the visual tokens word-like in norm and
direction; since v6 each patch's target also holds its cell's position words, " top" + " left",
so a token says where it is in the question's own words). Every question is trained exactly as it is asked at
test time: one image prefix shared by many question branches under a 4-D mask
(:func:`training_ids`). The trained projector is cached as safetensors in the user cache
(``$PRUNEKIT_CACHE/llava-dino-smol``); later calls load it.

Layout: the tower's layer 9 of 12 (``vision_feature_layer=-4``; a linear probe identified 77 % of
held-out items from its patch tokens vs 70 % from the last layer's) without [CLS]
(``vision_feature_select_strategy="default"``): 16 x 16 = 256 visual tokens per 224-px image.
The image placeholder is SmolLM2's token 16 (``<empty_output>``), which the chat format never
uses; :func:`prompt_ids` builds prompts with it. Images are grey ``uint8`` arrays, turned into
``pixel_values`` by :func:`pixel_values` (ImageNet normalisation, as DINOv2 expects).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..assets import cache_dir
from .packaged import dinov2_small, image_batch, smollm2
from .scenes import POSITIONS, Sample, SceneMaker, make_split

CANVAS_PX = 224
IMAGE_TOKEN_ID = 16  # "<empty_output>" in SmolLM2's vocabulary
N_VISUAL = 256
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained projector (its hash names the cache file).

    Two stages after a cheap word alignment, each with its own warm-up and cosine schedule:
    ``single_steps`` on one-item images ("What is this?": recognition), then ``steps`` on grid
    scenes with ``n_questions`` questions each (binding words to places, counting, presence), a
    ``singles`` fraction of one-item images mixed in so recognition is not forgotten.

    v6 (the default) keeps v4's stages with three times the scene steps, the word cross-entropy
    (``align_ce``) and the place component (``align_position``) in the alignment targets, trained
    with the frozen LLM in bf16. :data:`V4` is the earlier ~20-minute recipe.
    ``lora_rank=0`` trains the projector alone (LLaVA stage 1; ``version=3`` with ``lr=3e-3``,
    ``align_weight=0``, ``single_steps=200``, ``steps=100`` is the earlier projector-only recipe).
    """

    n_singles: int = 400  # stage-1 images: one item each
    single_steps: int = 100
    n_train: int = 200  # stage-2 images: grid scenes (and a ``singles`` fraction of one-item images)
    singles: float = 0.25
    n_questions: int = 24  # questions per stage-2 image, one branch each (fresh questions each pass)
    align_steps: int = 300  # stage 0: patch tokens regressed onto word embeddings (no LLM forward)
    steps: int = 600
    batch: int = 2
    lr: float = 1e-3  # the projector's
    warmup: int = 10
    weight_decay: float = 0.0
    feature_layer: int = -4  # the tower's hidden state the projector reads (LLaVA's vision_feature_layer)
    align_weight: float = 1.0  # > 0: the stage-0 word regression stays on as an auxiliary loss
    #: weight of a cross-entropy term over the 11 word targets (logits: minus squared distances) added
    #: to the alignment's MSE: sharper classes per patch (0: MSE alone, as v4)
    align_ce: float = 0.1
    #: weight of a place component in the alignment target: a patch's target becomes its class word plus
    #: this times the mean embedding of its cell's position words (" top", " left"), so each visual token
    #: also says where it is in the question's own words (0: class words alone, as v4)
    align_position: float = 1.0
    #: the frozen LLM's dtype while training ("bfloat16": about 1.3x faster a step where the CPU has native
    #: bf16 matrix units (AMX), emulated and slower elsewhere; the projector and LoRA factors stay float32)
    train_dtype: str = "bfloat16"
    lora_rank: int = 16  # > 0: also train rank-r adapters on the LLM's linear layers (LLaVA stage-2 style)
    lora_lr: float = 2e-3
    lora_targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0
    version: int = 6

    def __post_init__(self) -> None:
        if min(self.lora_rank, self.align_weight, self.align_ce, self.align_position) < 0:
            raise ValueError(
                "lora_rank, align_weight, align_ce and align_position must be >= 0 (0: off); got "
                f"lora_rank={self.lora_rank}, align_weight={self.align_weight}, align_ce={self.align_ce}, "
                f"align_position={self.align_position}"
            )
        if self.train_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train_dtype must be 'float32' or 'bfloat16'; got {self.train_dtype!r}")

    def key(self) -> str:
        d = asdict(self)
        for added, neutral in (("align_ce", 0), ("align_position", 0), ("train_dtype", "float32")):
            if d[added] == neutral:  # added after v4: neutral values keep v4's cache key
                del d[added]
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


#: the ~20-minute recipe v4 (scenes answered mostly from priors; ``06b84cd201``)
V4 = Recipe(steps=200, align_ce=0.0, align_position=0.0, train_dtype="float32", version=4)


# ------------------------------------------------------------------ prompts and images
def pixel_values(images: np.ndarray) -> torch.Tensor:
    """``uint8 (n, 224, 224)`` grey images -> ``(n, 3, 224, 224)`` float, ImageNet-normalised."""
    return image_batch(images, size=224)


def _image_prefix(tok, n_images: int) -> list[int]:
    """The user turn up to its question: the images, each a run of ``N_VISUAL`` placeholders."""
    ids = tok("<|im_start|>user\n", add_special_tokens=False).input_ids
    for i in range(n_images):
        if n_images > 1:
            ids += tok(f"Image {i + 1}: ", add_special_tokens=False).input_ids
        ids += [IMAGE_TOKEN_ID] * N_VISUAL + tok("\n", add_special_tokens=False).input_ids
    return ids


def _question(tok, question: str) -> list[int]:
    return tok(f"{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids


def prompt_ids(tok, question: str, n_images: int = 1) -> list[int]:
    """Token ids of a one-question chat prompt with ``n_images`` images, ending where the answer starts."""
    return _image_prefix(tok, n_images) + _question(tok, question)


def training_ids(tok, sample: Sample) -> tuple[list[int], list[int], list[int], list[int]]:
    """A sample as one shared image prefix with one branch per question: ``(ids, labels, positions,
    branch)``, labels -100 where not scored, branch -1 on the prefix.

    Each branch is the rest of the one-question prompt of :func:`prompt_ids` plus its answer, at the
    positions it has there, and sees only the prefix and itself (:func:`_branch_batch` builds the
    mask): every question is trained exactly as it is asked at test time, the image is encoded once
    for all of them, and no answer can be read off an earlier one.
    """
    pre = _image_prefix(tok, len(sample.images))
    end = tok("<|im_end|>", add_special_tokens=False).input_ids
    ids, labels = list(pre), [-100] * len(pre)
    pos, branch = list(range(len(pre))), [-1] * len(pre)
    for j, qa in enumerate(sample.qas):
        prompt = _question(tok, qa.question)
        ans = tok(qa.answer, add_special_tokens=False).input_ids + end
        ids += prompt + ans
        labels += [-100] * len(prompt) + ans
        pos += range(len(pre), len(pre) + len(prompt) + len(ans))
        branch += [j] * (len(prompt) + len(ans))
    return ids, labels, pos, branch


def answer_batches(tok, n_batches: int, batch: int = 4, seed: int = 0, split: str = "train") -> list[dict]:
    """Model inputs with answers for training modules on the frozen VLM (ATP-LLaVA's thresholds):
    ``n_batches`` dicts of ``input_ids`` / ``attention_mask`` (left padding) / ``pixel_values`` /
    ``labels`` (-100 except the answer), one scene and one of its questions per row."""
    maker = SceneMaker(split, seed=seed)
    end = tok("<|im_end|>", add_special_tokens=False).input_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for _ in range(n_batches):
        rows, labels, images = [], [], []
        for _ in range(batch):
            s = maker.scene(n_questions=1)
            while not s.qas:  # a "left of" question may not exist in a layout
                s = maker.scene(n_questions=1)
            qa = s.qas[0]
            prompt, ans = (
                prompt_ids(tok, qa.question),
                tok(qa.answer, add_special_tokens=False).input_ids + end,
            )
            rows.append(prompt + ans)
            labels.append([-100] * len(prompt) + ans)
            images.append(s.images)
        L = max(map(len, rows))
        gaps = [L - len(r) for r in rows]  # left padding
        out.append({
            "input_ids": torch.tensor([[pad] * g + r for g, r in zip(gaps, rows, strict=True)]),
            "attention_mask": torch.tensor([[0] * g + [1] * (L - g) for g in gaps]),
            "labels": torch.tensor([[-100] * g + lab for g, lab in zip(gaps, labels, strict=True)]),
            "pixel_values": pixel_values(np.concatenate(images)),
        })  # fmt: skip
    return out


# ------------------------------------------------------------------ the model
def _config(vision, lm, feature_layer: int = -4):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision.config.to_dict() | {"model_type": "dinov2"},
        text_config=lm.config.to_dict() | {"model_type": "llama"},
        image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=N_VISUAL,
        multimodal_projector_bias=True,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )


def assemble(
    projector: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    feature_layer: int = Recipe.feature_layer,
):
    """``(LlavaForConditionalGeneration, tokenizer)`` from the real parts and a trained state dict: the
    projector's weights, and LoRA factors (``lora.<path>.A`` / ``.B``) merged into the LLM's weights."""
    from transformers import LlavaForConditionalGeneration

    vision = dinov2_small(torch.float32)
    lm, tok = smollm2(torch.float32)
    cfg = _config(vision, lm, feature_layer)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    state = {f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()}
    state |= {f"model.language_model.{k}": v for k, v in lm.model.state_dict().items()}
    state["lm_head.weight"] = lm.lm_head.weight
    if projector is None:
        dv = vision.config.hidden_size  # untrained: identity standardisation, seeded init
        projector = _Projector(dv, lm.config.hidden_size, torch.zeros(dv), torch.ones(dv), seed=0).folded()
    for name, delta in lora_deltas(projector).items():  # trained LLM adapters, merged into the weights
        key = f"model.language_model.{name}.weight"
        state[key] = state[key] + delta.to(state[key].dtype)
    projector = {k: v for k, v in projector.items() if not k.startswith("lora.")}
    state |= {f"model.multi_modal_projector.{k}": v for k, v in projector.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"assembling the VLM: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # non-persistent buffers (rotary inv_freq, ...) are not in state dicts: take them from the parts
    sources = {f"model.vision_tower.{k}": v for k, v in vision.named_buffers()}
    sources |= {f"model.language_model.{k}": v for k, v in lm.model.named_buffers()}
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            if name not in sources:
                raise RuntimeError(f"assembling the VLM: buffer {name} has no source")
            model.get_submodule(owner).register_buffer(attr, sources[name].clone(), persistent=False)
    tok.padding_side = "left"
    return model.to(dtype).eval(), tok


class _LoRA(nn.Module):
    """A low-rank update ``B A`` of rank ``r`` beside a frozen linear layer: its output adds
    ``B (A x)`` (``B`` starts at zero, so training starts from the real LLM; Hu et al., 2021). A side
    path, not a weight parametrisation, so backward never forms the full weight's gradient. Only
    used while training; the saved factors are merged into the weights."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return out + nn.functional.linear(nn.functional.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))


def _add_lora(lm: nn.Module, recipe: Recipe) -> dict[str, _LoRA]:
    """Trainable low-rank updates beside the targeted linear layers of ``lm.model`` (forward hooks;
    ``lm`` is a training copy, dropped after training)."""
    g = torch.Generator().manual_seed(recipe.seed)
    adapters = {}
    for name, mod in lm.model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in recipe.lora_targets:
            adapters[name] = _LoRA(mod.out_features, mod.in_features, recipe.lora_rank, g)
            mod.register_forward_hook(adapters[name].hook)
    if not adapters:
        raise ValueError(f"lora_targets {recipe.lora_targets} match no linear layer of the LLM")
    return adapters


def lora_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module path in the LLM: B @ A}`` from the ``lora.<path>.A`` / ``.B`` entries of a saved state."""
    names = {k[len("lora.") : -len(".A")] for k in state if k.startswith("lora.") and k.endswith(".A")}
    return {n: state[f"lora.{n}.B"].float() @ state[f"lora.{n}.A"].float() for n in sorted(names)}


class _Projector(nn.Module):
    """LLaVA's projector on standardised features; :meth:`folded` puts the standardisation into
    ``linear_1`` so the saved weights run on raw features in ``LlavaMultiModalProjector``."""

    def __init__(self, d_vision: int, d_text: int, mean: torch.Tensor, std: torch.Tensor, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.linear_1 = nn.Linear(d_vision, d_text)
        self.linear_2 = nn.Linear(d_text, d_text)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x = (f.float() - self.mean) / self.std
        return self.linear_2(nn.functional.gelu(self.linear_1(x)))

    def folded(self) -> dict[str, torch.Tensor]:
        w = self.linear_1.weight / self.std[None, :]
        b = self.linear_1.bias - (w * self.mean[None, :]).sum(1)
        return {
            "linear_1.weight": w.detach().clone(), "linear_1.bias": b.detach().clone(),
            "linear_2.weight": self.linear_2.weight.detach().clone(),
            "linear_2.bias": self.linear_2.bias.detach().clone(),
        }  # fmt: skip


@torch.inference_mode()
def vision_features(
    tower: nn.Module,
    images: np.ndarray,
    batch: int = 32,
    progress: bool = True,
    layer: int = Recipe.feature_layer,
) -> torch.Tensor:
    """Frozen tower features the projector sees: ``hidden_states[layer]``, [CLS] dropped ->
    ``(n, 256, d)`` bf16."""
    out = []
    for i in tqdm(range(0, len(images), batch), desc="vision features", unit="batch", disable=not progress):
        hs = tower(pixel_values(images[i : i + batch]), output_hidden_states=True).hidden_states[layer]
        out.append(hs[:, 1:].to(torch.bfloat16))
    return torch.cat(out)


def train_projector(recipe: Recipe = Recipe(), progress: bool = True) -> tuple[dict, dict]:
    """Train the projector with the recipe; returns ``(folded state dict, training log)``."""
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    vision = dinov2_small(torch.float32)
    # bf16 only where the CPU has native bf16 (AVX512-BF16 / AMX): elsewhere it is emulated, slower
    lm, tok = smollm2(getattr(torch, recipe.train_dtype))
    lm.requires_grad_(False)
    lm.set_attn_implementation("eager")  # under the branch mask: 3.8 s a step vs sdpa's 4.4 on 2 cores
    singles = make_split("train", recipe.n_singles, recipe.seed + 1, singles=1.0)
    scenes = make_split("train", recipe.n_train, recipe.seed, singles=recipe.singles,
                        n_questions=recipe.n_questions)  # fmt: skip
    images = np.concatenate([s.images for s in singles + scenes])
    feats = vision_features(vision, images, progress=progress, layer=recipe.feature_layer)  # (n, 256, d)
    del vision
    t_feat = time.perf_counter() - t0
    flat = feats.float().reshape(-1, feats.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-3)
    del flat
    proj = _Projector(feats.shape[-1], lm.config.hidden_size, mean, std, recipe.seed)
    embed = lm.get_input_embeddings()
    if recipe.align_steps:
        _align_words(proj, feats, singles + scenes, tok, embed, recipe, progress)
    groups = [{"params": list(proj.parameters()), "lr": recipe.lr, "base_lr": recipe.lr}]
    adapters = _add_lora(lm, recipe) if recipe.lora_rank else {}
    if adapters:
        lora_params = [p for a in adapters.values() for p in a.parameters()]
        groups.append({"params": lora_params, "lr": recipe.lora_lr, "base_lr": recipe.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    losses = []
    stages = [("recognition", singles, feats[: len(singles)], recipe.single_steps),
              ("scenes", scenes, feats[len(singles) :], recipe.steps)]  # fmt: skip
    for name, samples, f, steps in stages:
        if steps:
            losses += _train_stage(name, proj, lm, tok, samples, f, steps, opt, recipe, progress)
    log = {"recipe": asdict(recipe), "feature_seconds": t_feat, "train_seconds": time.perf_counter() - t0,
           "loss_first20": float(np.mean(losses[:20])), "loss_last20": float(np.mean(losses[-20:])),
           "losses": losses, "threads": torch.get_num_threads()}  # fmt: skip
    state = proj.folded()
    for name, a in adapters.items():
        state[f"lora.{name}.A"], state[f"lora.{name}.B"] = a.A.detach().clone(), a.B.detach().clone()
    return state, log


def _train_stage(name, proj, lm, tok, samples, feats, steps, opt, recipe, progress) -> list[float]:
    """``steps`` steps of ``recipe.batch`` images; each pass over the images asks fresh questions."""
    for group in opt.param_groups:
        group["lr"] = group["base_lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(recipe.warmup, steps))
    embed = lm.get_input_embeddings()
    n, passes = len(samples), math.ceil(steps * recipe.batch / len(samples))
    encoded = [training_ids(tok, s) for s in samples]
    for p in range(1, passes):
        asker = SceneMaker("train", seed=recipe.seed * 1000 + p)
        encoded += [training_ids(tok, asker.reask(s, recipe.n_questions)) for s in samples]
    first_image = np.cumsum([0] + [len(s.images) for s in samples])
    if recipe.align_weight:
        words = torch.cat([patch_words(s) for s in samples])  # (images, 256)
        targets = _word_targets(tok, embed)
        offsets = _place_offsets(samples, tok, embed, recipe)
    rng = np.random.default_rng(recipe.seed)
    order = np.concatenate([p * n + rng.permutation(n) for p in range(passes)])
    losses = []
    bar = tqdm(range(steps), desc=f"training the projector: {name}", unit="step", disable=not progress)
    for step in bar:
        idx = order[step * recipe.batch : (step + 1) * recipe.batch]
        ids, labels, pos, mask = _branch_batch([encoded[i] for i in idx], pad=tok.pad_token_id or 0)
        f = torch.cat([feats[first_image[i % n] : first_image[i % n + 1]] for i in idx])
        with torch.no_grad():
            x = embed(ids)
        vis = proj(f).to(x.dtype)
        x = x.masked_scatter((ids == IMAGE_TOKEN_ID)[..., None].expand_as(x), vis)
        h = lm.model(inputs_embeds=x, attention_mask=mask.to(x.dtype), position_ids=pos).last_hidden_state
        tgt = labels[:, 1:]
        rows = tgt != -100
        logits = lm.lm_head(h[:, :-1][rows]).float()
        loss = nn.functional.cross_entropy(logits, tgt[rows])
        if recipe.align_weight:
            span = [slice(first_image[i % n], first_image[i % n + 1]) for i in idx]
            w = torch.cat([words[sl] for sl in span])
            off = None if offsets is None else offsets[1][torch.cat([offsets[0][sl] for sl in span])]
            loss = loss + recipe.align_weight * _align_loss(vis.float(), w, targets, recipe, off)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def _patch_cells(grid: int, side: int = 16) -> np.ndarray:
    """The grid cell under the centre of each of the ``side x side`` patches, raster order."""
    p = CANVAS_PX // side
    centre = np.minimum((np.arange(side) * p + p // 2) // (CANVAS_PX // grid), grid - 1)
    return (centre[:, None] * grid + centre[None, :]).reshape(-1)


def patch_words(sample: Sample, side: int = 16) -> torch.Tensor:
    """Per image, the class under each of the ``side x side`` patches (10 = nothing: a black patch)."""
    out = []
    for image, cells in zip(sample.images, sample.cells, strict=True):
        p = CANVAS_PX // side
        patches = image.reshape(side, p, side, p).max(axis=(1, 3)).reshape(-1)  # brightest pixel
        label = np.where(patches > 0, np.asarray(cells)[_patch_cells(math.isqrt(len(cells)), side)], -1)
        out.append(torch.from_numpy(np.where(label < 0, 10, label)))
    return torch.stack(out)


#: the position names of the grid cells (:data:`~prunekit.zoo.scenes.POSITIONS`); index 0: no place
PLACES = ("", *dict.fromkeys(POSITIONS[2] + POSITIONS[3]))


def patch_places(sample: Sample, side: int = 16) -> torch.Tensor:
    """Per image, the index in :data:`PLACES` of the cell's name under each patch (0 for one-item
    images, which have no cells to name)."""
    out = []
    for cells in sample.cells:
        grid = math.isqrt(len(cells))
        names = np.array([0] if grid == 1 else [PLACES.index(n) for n in POSITIONS[grid]])
        out.append(torch.from_numpy(names[_patch_cells(grid, side)]))
    return torch.stack(out)


def _place_targets(tok, embed: nn.Module) -> torch.Tensor:
    """``(len(PLACES), d)``: per cell name, the mean input embedding of its words (" top left": the
    tokens " top", " left"); zeros for "no place"."""
    with torch.no_grad():
        ids = [tok(" " + n, add_special_tokens=False).input_ids for n in PLACES[1:]]
        rows = [embed(torch.tensor(i)).mean(0) for i in ids]
    return torch.cat([torch.zeros(1, rows[0].shape[-1]), torch.stack(rows).float()])


def _word_targets(tok, embed: nn.Module) -> torch.Tensor:
    """``(11, d)`` input embeddings of the class words and " nothing" (the target of empty patches);
    a word of several tokens gives their mean."""
    from .scenes import CLASSES

    with torch.no_grad():
        return torch.stack([embed(torch.tensor(tok(w, add_special_tokens=False).input_ids)).mean(0)
                            for w in [*(" " + c for c in CLASSES), " nothing"]]).float()  # fmt: skip


def _align_loss(
    vis: torch.Tensor, words: torch.Tensor, targets: torch.Tensor, recipe: Recipe,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """MSE of the projected tokens to their words' embeddings (plus a per-token ``offset``: the place
    component of ``Recipe.align_position``), plus ``align_ce`` times the cross-entropy of picking the
    right word among the 11 by (minus squared) distance, after the offset is taken off."""
    vis, words = vis.reshape(-1, vis.shape[-1]), words.reshape(-1)
    if offset is not None:
        vis = vis - offset.reshape(vis.shape)
    loss = nn.functional.mse_loss(vis, targets[words])
    if recipe.align_ce:
        loss = loss + recipe.align_ce * nn.functional.cross_entropy(-(torch.cdist(vis, targets) ** 2), words)
    return loss


def _place_offsets(samples, tok, embed: nn.Module, recipe: Recipe):
    """The place components of the alignment targets as ``(places, table)``: the ``(images, 256)``
    indices of :func:`patch_places` and the ``(len(PLACES), d)`` scaled word means, so a batch
    indexes ``table[places[...]]`` without an ``(images, 256, d)`` copy (None when
    ``align_position`` is 0)."""
    if not recipe.align_position:
        return None
    return torch.cat([patch_places(s) for s in samples]), recipe.align_position * _place_targets(tok, embed)


def _align_words(proj: nn.Module, feats: torch.Tensor, samples, tok, embed: nn.Module, recipe: Recipe,
                 progress: bool) -> None:  # fmt: skip
    """Stage 0, no LLM forward: regress each patch's projected token onto the input embedding of
    the word for what lies under it (" bag", " nothing"), so the LLM starts from word-like tokens."""
    target = _word_targets(tok, embed)
    labels = torch.cat([patch_words(s) for s in samples]).reshape(-1)
    offsets = _place_offsets(samples, tok, embed, recipe)
    x = feats.reshape(-1, feats.shape[-1])
    opt = torch.optim.AdamW(proj.parameters(), lr=recipe.lr)
    g = torch.Generator().manual_seed(recipe.seed)
    for _ in tqdm(
        range(recipe.align_steps), desc="aligning tokens to words", unit="step", disable=not progress
    ):
        rows = torch.randint(0, x.shape[0], (4096,), generator=g)
        off = None if offsets is None else offsets[1][offsets[0].reshape(-1)[rows]]
        loss = _align_loss(proj(x[rows]), labels[rows], target, recipe, off)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _cosine(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


def _branch_batch(items, pad: int):
    """Right-padded ``ids, labels, positions`` and the additive 4-D mask of :func:`training_ids`
    sequences: causal, and a branch token sees the prefix and its own branch only."""
    L, B = max(len(i[0]) for i in items), len(items)
    ids = torch.full((B, L), pad, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    branch = torch.full((B, L), -2, dtype=torch.long)  # -2: padding
    for r, (i, lab, p, b) in enumerate(items):
        n = len(i)
        ids[r, :n], labels[r, :n], pos[r, :n], branch[r, :n] = (torch.tensor(v) for v in (i, lab, p, b))
    q, k = branch[:, :, None], branch[:, None, :]
    allow = ((q == k) | (k == -1)) & (k != -2) & torch.ones(L, L, dtype=torch.bool).tril()
    allow |= torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves (never scored)
    mask = torch.zeros(B, 1, L, L).masked_fill_(~allow[:, None], torch.finfo(torch.float32).min)
    return ids, labels, pos, mask


def llava_dino_smol(
    dtype: torch.dtype = torch.float32,
    *,
    recipe: Recipe = Recipe(),
    progress: bool = True,
    retrain: bool = False,
):
    """``(LlavaForConditionalGeneration, tokenizer)``: DINOv2-S + SmolLM2-135M with the trained projector.

    The first call trains the projector and the LLM's LoRA adapters (recipe v6: about an hour on 2
    CPU cores with native bf16 (AMX), with progress bars; ``recipe=V4`` takes about 20 minutes but
    answers scenes mostly from priors) and caches them (22 MB); later calls load in seconds.
    ``retrain=True`` trains again.
    """
    from safetensors.torch import load_file, save_file

    d = cache_dir("llava-dino-smol")
    path = d / f"projector-{recipe.key()}.safetensors"
    if retrain or not path.exists():
        if recipe.train_dtype == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            warnings.warn(
                "this CPU has no native bf16: training the VLM's projector (train_dtype='bfloat16') will be "
                "several times slower; Recipe(train_dtype='float32') avoids it (another cache file)",
                stacklevel=2,
            )
        state, log = train_projector(recipe, progress=progress)
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(path),
            metadata={"recipe": json.dumps(asdict(recipe))},
        )
        (d / f"train-log-{recipe.key()}.json").write_text(json.dumps(log, indent=1))
    return assemble(load_file(str(path)), dtype, recipe.feature_layer)


def training_log(recipe: Recipe = Recipe()) -> dict | None:
    """The log written when the cached projector was trained (losses, seconds), if any."""
    p = cache_dir("llava-dino-smol") / f"train-log-{recipe.key()}.json"
    return json.loads(p.read_text()) if p.exists() else None
