"""ViT task: Fashion-MNIST (real images, Debian ``dataset-fashion-mnist``) classified from the
model's pooled output by a linear probe and by kNN, both fit once on dense features of training
images (cached on disk) and applied to the pruned model's features of test images."""

from __future__ import annotations

import numpy as np
import torch

from ...assets import cache_dir, fashion_mnist
from ..models import Loaded
from .base import Task, TaskOutput, Treat


def fit_probe(train: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = 1e-3):
    """A linear probe (multinomial logistic regression, L-BFGS) on standardised features."""
    train = train.float()
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    z = (train - mean) / std
    W = torch.zeros(z.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ W + bias, labels) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W, bias = W.detach(), bias.detach()
    return lambda x: (((x.float() - mean) / std) @ W + bias).argmax(-1)


def knn_predict(train: torch.Tensor, labels: torch.Tensor, x: torch.Tensor, k: int, classes: int):
    """Majority vote of the ``k`` training features nearest by cosine (ties: lower class)."""
    a = torch.nn.functional.normalize(train.float(), dim=-1)
    b = torch.nn.functional.normalize(x.float(), dim=-1)
    nearest = (b @ a.T).topk(k, dim=-1).indices  # (N, k)
    votes = torch.zeros(x.shape[0], classes).scatter_add_(1, labels[nearest], torch.ones(nearest.shape))
    return votes.argmax(-1)


class FashionMNIST(Task):
    name = "fashion"
    kind = "vit"
    primary = "probe_acc"
    default_limit = 500  # test images
    summary = "Fashion-MNIST linear probe and 10-NN on pooled features (probe fit on dense train features)"
    n_train = 1000
    k = 10
    batch = 32
    timing_batch = 16

    def _features(self, model, x: torch.Tensor) -> torch.Tensor:
        dev = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        return torch.cat([model(pixel_values=b.to(dev, dtype)).pooler_output.float().cpu()
                          for b in x.split(self.batch)])  # fmt: skip

    def prepare(self, loaded: Loaded) -> None:
        if self.prepared_for == loaded.name:
            return
        from ...zoo.packaged import image_batch

        size = getattr(loaded.model.config, "image_size", 224)
        size = 224 if size > 224 else size  # DINOv2 interpolates its position embeddings
        Xtr, ytr = fashion_mnist("train")
        Xte, yte = fashion_mnist("test")
        safe = loaded.name.replace("/", "--")
        file = cache_dir("bench") / f"{safe}_fashion_train{self.n_train}_{size}px.npz"
        with torch.inference_mode():
            if file.exists():
                train = torch.from_numpy(np.load(file)["f"])
            else:
                train = self._features(loaded.model, image_batch(Xtr[: self.n_train], size))
                np.savez(file, f=train.numpy())
        labels = torch.from_numpy(ytr[: self.n_train].astype(np.int64))
        self.train, self.labels = train, labels
        self.probe = fit_probe(train, labels, 10)
        pick = self.subsample(len(Xte))
        self.test_x = image_batch(Xte[pick], size)
        self.truth = torch.from_numpy(yte[pick].astype(np.int64))
        self.prepared_for = loaded.name

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        self.prepare(loaded)
        with torch.inference_mode(), treat() as session:
            feats = self._features(loaded.model, self.test_x)
            kept = None if session is None else session.stats.kept_fraction
        probe_pred = self.probe(feats)
        knn = knn_predict(self.train, self.labels, feats, self.k, 10)
        metrics = {
            "probe_acc": (probe_pred == self.truth).double().mean().item(),
            "knn_acc": (knn == self.truth).double().mean().item(),
        }
        return TaskOutput(metrics, feats, len(self.truth), kept, {"pred": probe_pred})

    def agreement(self, dense: TaskOutput, pruned: TaskOutput) -> dict[str, float]:
        cos = torch.nn.functional.cosine_similarity(dense.probe, pruned.probe, dim=-1)
        return {
            "cosine": cos.mean().item(),
            "top1_agree": (dense.extra["pred"] == pruned.extra["pred"]).double().mean().item(),
        }

    def timing(self, loaded: Loaded):
        model = loaded.model
        dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        x = self.test_x[: self.timing_batch].to(dev, dtype)

        def run(treat: Treat):
            with torch.inference_mode(), treat():
                return model(pixel_values=x)

        return {"prefill": run}


TASKS = {"fashion": FashionMNIST}
