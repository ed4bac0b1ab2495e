"""How well do the real-parts VLM's visual tokens name the items under them? (issue 4)

Trains only the projector's stage-0 word alignment (no LLM forward) on the recipe's training
images and decodes each held-out visual token to its nearest word embedding (the 10 class words
and " nothing"). Reports the per-patch accuracy on item patches, and the per-cell accuracy of a
majority vote over each item's patches: what the LLM could at best read from a scene. Compares the
recipe's MSE alignment with ``align_ce`` (cross-entropy over the words added).

Run: ``PYTHONPATH=src python benchmarks/vlm_patch_probe.py`` (about 3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import torch

from prunekit.zoo import dinov2_small, smollm2
from prunekit.zoo.llava_dino_smol import (
    CANVAS_PX,
    V4,
    Recipe,
    _align_words,
    _Projector,
    _word_targets,
    patch_words,
    vision_features,
)
from prunekit.zoo.scenes import SceneMaker, make_split


def cell_accuracy(pred: torch.Tensor, samples, words: torch.Tensor) -> float:
    """Majority vote of each item's patches against the item's class."""
    right = total = 0
    for s, p, w in zip(samples, pred, words, strict=True):
        cells = s.cells[0]
        grid = math.isqrt(len(cells))
        centre = np.minimum((np.arange(16) * 14 + 7) // (CANVAS_PX // grid), grid - 1)
        cell_of = torch.from_numpy((centre[:, None] * grid + centre[None, :]).reshape(-1))
        for c, k in enumerate(cells):
            if k >= 0:
                votes = torch.bincount(p[(cell_of == c) & (w < 10)], minlength=11)[:10]
                right += int(votes.argmax()) == int(k)
                total += 1
    return right / total


def main() -> None:
    base = Recipe()
    vision, (lm, tok) = dinov2_small(torch.float32), smollm2(torch.float32)
    train = make_split("train", base.n_singles, base.seed + 1, singles=1.0)
    train += make_split("train", base.n_train, base.seed, singles=base.singles, n_questions=4)
    maker = SceneMaker("test", seed=10_000)
    test = [maker.scene(n_questions=1) for _ in range(80)]
    f_train = vision_features(vision, np.concatenate([s.images for s in train]), layer=base.feature_layer)
    f_test = vision_features(vision, np.concatenate([s.images for s in test]), layer=base.feature_layer)
    flat = f_train.float().reshape(-1, f_train.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-3)
    embed = lm.get_input_embeddings()
    targets = _word_targets(tok, embed)
    words = torch.cat([patch_words(s) for s in test])
    for align_ce in (0.0, 0.1):
        recipe = replace(V4, align_ce=align_ce)  # class words only (no place component)
        proj = _Projector(f_train.shape[-1], lm.config.hidden_size, mean, std, recipe.seed)
        _align_words(proj, f_train, train, tok, embed, recipe, progress=False)
        with torch.no_grad():
            v = proj(f_test.reshape(-1, f_test.shape[-1]))
            pred = torch.cdist(v, targets).argmin(-1).view(len(test), -1)
        item = words < 10
        print(json.dumps({
            "align_ce": align_ce,
            "item_patch_acc": round(float((pred[item] == words[item]).float().mean()), 3),
            "background_acc": round(float((pred[~item] == words[~item]).float().mean()), 3),
            "cell_majority_acc": round(cell_accuracy(pred, test, words), 3),
            "token_norm": round(float(v.norm(dim=-1).mean()), 2),
            "word_norm": round(float(targets.norm(dim=-1).mean()), 2),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
