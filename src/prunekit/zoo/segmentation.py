"""Semantic segmentation from real images: Fashion-MNIST scenes (:mod:`prunekit.zoo.scenes`) with a
class per pixel, and linear segmentation heads on the real DINOv2-S/14, trained on CPU.

A scene's mask gives each pixel of a pasted item (grey value above ``INK``) its Fashion-MNIST
class (0-9) and every other pixel the background class 10. At 224 px DINOv2-S sees 16x16 patches
of 14 px; a patch's training label is the majority class of its 196 pixels, and predictions are
scored per pixel (each patch's class painted over its 14x14 pixels).

Heads (:class:`SegHeads`): one linear head on the final, layer-normed patch features (the
segmenter) and one auxiliary linear head on the features after each of the early-exit blocks
(DToP's stage boundaries), each after a parameter-free layer norm. They are fit by full-batch
Adam on features of ``n_train`` training scenes (items from the Fashion-MNIST *train* split;
test scenes use the *test* split), deterministically, and cached as safetensors under
``~/.cache/prunekit/segmentation``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..assets import cache_dir
from .scenes import CANVAS, SceneMaker

BACKGROUND = 10
N_CLASSES = 11
INK = 40  # grey level above which a pasted pixel belongs to its item
PATCH = 14


def scenes(split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes: images ``uint8 (n, 224, 224)`` and masks ``uint8 (n, 224, 224)`` (0-9 items,
    10 background); 2x2 and 3x3 grids alternate."""
    maker = SceneMaker(split, seed)
    images = np.zeros((n, CANVAS, CANVAS), dtype=np.uint8)
    masks = np.full((n, CANVAS, CANVAS), BACKGROUND, dtype=np.uint8)
    for i in range(n):
        grid = 2 + i % 2
        cells = maker.layout(grid)
        img = maker.render(cells, grid)
        size = CANVAS // grid
        cls = np.full((CANVAS, CANVAS), BACKGROUND, dtype=np.uint8)
        for c, k in enumerate(cells):
            if k >= 0:
                r, col = divmod(c, grid)
                cls[r * size : (r + 1) * size, col * size : (col + 1) * size] = k
        images[i] = img
        masks[i] = np.where(img > INK, cls, BACKGROUND)
    return images, masks


def patch_labels(masks: np.ndarray) -> torch.Tensor:
    """``(n, 224, 224)`` pixel classes -> ``(n, 256)`` majority class of each 14x14 patch (ties: lower)."""
    m = torch.from_numpy(masks.astype(np.int64))
    n, g = m.shape[0], CANVAS // PATCH
    blocks = m.view(n, g, PATCH, g, PATCH).permute(0, 1, 3, 2, 4).reshape(n, g * g, PATCH * PATCH)
    counts = torch.nn.functional.one_hot(blocks, N_CLASSES).sum(dim=2)  # (n, 256, C)
    return counts.argmax(dim=-1)


def paint(patch_pred: torch.Tensor) -> torch.Tensor:
    """``(n, 256)`` patch classes -> ``(n, 224, 224)`` pixel classes."""
    n, g = patch_pred.shape[0], CANVAS // PATCH
    return patch_pred.view(n, g, 1, g, 1).expand(n, g, PATCH, g, PATCH).reshape(n, CANVAS, CANVAS)


def confusion(pred: torch.Tensor, truth: torch.Tensor, classes: int = N_CLASSES) -> torch.Tensor:
    """``(classes, classes)`` pixel counts, rows = truth."""
    idx = truth.flatten().long() * classes + pred.flatten().long()
    return torch.bincount(idx, minlength=classes * classes).view(classes, classes)


def mean_iou(conf: torch.Tensor) -> float:
    """Mean over the classes present (in truth or prediction) of ``TP / (TP + FP + FN)``."""
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    present = union > 0
    return (tp[present] / union[present]).mean().item()


class SegHeads(nn.Module):
    """Linear per-patch classifiers: ``final`` on the model's layer-normed output, and an auxiliary
    head after each block in ``exits`` (on a parameter-free layer norm of that block's output)."""

    def __init__(self, dim: int, exits: tuple[int, ...], classes: int = N_CLASSES) -> None:
        super().__init__()
        self.exits = tuple(exits)
        self.aux = nn.ModuleDict({str(b): nn.Linear(dim, classes) for b in self.exits})
        self.final = nn.Linear(dim, classes)

    def auxiliary(self, block: int, h: torch.Tensor) -> torch.Tensor:
        """Logits from the features after ``block`` blocks (``h (..., D)``)."""
        return self.aux[str(block)](nn.functional.layer_norm(h.float(), h.shape[-1:]))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.final(h.float())


def patch_features(model, images: np.ndarray, exits: tuple[int, ...], batch: int = 16, progress: bool = True):
    """Per exit block and ``"final"``: ``(n, 256, D)`` float16 patch features of ``images``."""
    from tqdm.auto import tqdm

    from .packaged import image_batch

    out: dict[str, list[torch.Tensor]] = {str(b): [] for b in exits} | {"final": []}
    with torch.inference_mode():
        for s in tqdm(range(0, len(images), batch), desc="DINOv2 features", disable=not progress):
            o = model(pixel_values=image_batch(images[s : s + batch]), output_hidden_states=True)
            for b in exits:
                out[str(b)].append(o.hidden_states[b][:, 1:].half())
            out["final"].append(o.last_hidden_state[:, 1:].half())
    return {k: torch.cat(v) for k, v in out.items()}


def fit_heads(
    feats: dict[str, torch.Tensor],
    labels: torch.Tensor | dict,
    exits: tuple[int, ...],
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    heads: SegHeads | None = None,
) -> SegHeads:
    """Fit the heads named in ``feats`` (exit block as a string, or ``"final"``) by full-batch Adam
    on cross-entropy: ``feats[k] (n, 256, D)`` with ``labels (n, 256)``, or ``(m, D)`` features
    with ``labels[k] (m,)``. Heads not named keep their weights (from ``heads``, if given)."""
    torch.manual_seed(seed)
    dim = next(iter(feats.values())).shape[-1]
    heads = SegHeads(dim, exits) if heads is None else heads
    for key, f in feats.items():
        x = f.flatten(0, -2).float()
        y = (labels[key] if isinstance(labels, dict) else labels).flatten()
        layer = heads.final if key == "final" else heads.aux[key]
        fn = heads.head if key == "final" else (lambda h, b=int(key): heads.auxiliary(b, h))
        opt = torch.optim.Adam(layer.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(fn(x), y)
                loss.backward()
                opt.step()
    return heads.eval()


def segmentation_heads(model, exits: tuple[int, ...] = (4, 8), n_train: int = 256, seed: int = 0,
                       progress: bool = True) -> SegHeads:  # fmt: skip
    """The DINOv2-S segmentation heads, trained once (about a minute on 2 cores) and cached."""
    from safetensors.torch import load_file, save_file

    file = (
        cache_dir("segmentation")
        / f"dinov2-s_heads_{'-'.join(map(str, exits))}_n{n_train}_s{seed}.safetensors"
    )
    dim = model.config.hidden_size
    if file.exists():
        heads = SegHeads(dim, exits)
        heads.load_state_dict(load_file(file))
        return heads.eval()
    images, masks = scenes("train", n_train, seed)
    feats = patch_features(model, images, exits, progress=progress)
    heads = fit_heads(feats, patch_labels(masks), exits, seed=seed)
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, file)
    return heads


def fit_heads_in_loop(
    model,
    heads: SegHeads,
    images: np.ndarray,
    masks: np.ndarray,
    p0: float,
    top_k: int,
    exits: tuple[int, ...] | None = None,
    batch: int = 16,
    seed: int = 0,
) -> SegHeads:
    """DToP with the heads trained in the loop (a frozen backbone's stand-in for the paper's
    end-to-end training): run DToP on training scenes, and refit every head after the first exit,
    and the final one, on the features of the patches still in play when it reads them (the dense
    features shift once easy tokens leave). Returns new heads; ``heads`` is not changed."""
    import copy

    from ..tokens.dtop import DToP
    from .packaged import image_batch

    runner = DToP(model, heads, p0=p0, top_k=top_k, exits=exits)
    labels = patch_labels(masks)
    keys = [str(b) for b in runner.exits[1:]] + ["final"]
    feats: dict[str, list] = {k: [] for k in keys}
    ys: dict[str, list] = {k: [] for k in keys}
    for s in range(0, len(images), batch):
        out = runner(image_batch(images[s : s + batch]), collect=True)
        for key, (f, where) in out.features.items():
            k = str(key)
            if k in feats:
                feats[k].append(f.half())
                ys[k].append(labels[s : s + batch][where[:, 0], where[:, 1]])
    new = copy.deepcopy(heads)
    return fit_heads({k: torch.cat(v) for k, v in feats.items()}, {k: torch.cat(v) for k, v in ys.items()},
                     heads.exits, seed=seed, heads=new).eval()  # fmt: skip
