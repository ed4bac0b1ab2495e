"""Meta Pruning via Graph Metanetworks, at the scale of a small MLP.

Liu et al., "Meta Pruning via Graph Metanetworks: A Universal Meta Learning Framework for Network
Pruning" (arXiv 2506.12041), official code ``Yewei-Liu/MetaPruning`` (spec ``training-aware.md``
§7). A graph neural network (the *metanetwork*) reads a trained network as a graph and writes a
new set of weights for the same architecture, trained so that the rewritten network is both
accurate and **easy to prune** (a group-norm regulariser pushes the least important groups
towards zero). The pipeline then prunes the rewritten network with ordinary group-L2 pruning.

1. **Network -> graph, a bijection** (:func:`state_dict_to_graph`, :func:`graph_to_state_dict`):
   for an :class:`~prunekit.models.convnets.MLP` a node is a neuron (the inputs first, then each
   Linear's outputs in order) with one feature, its bias (0 for the input nodes); an edge is one
   weight ``W_i[o, j]`` with one feature, its value; ``edge_index`` row 0 is the output neuron,
   row 1 the input neuron (the official ``cartesian(out, in)ᵀ``), edges in row-major order of
   each ``W_i``. The inverse reads the tensors back with views, so the round trip is exact and
   differentiable. The MLP form is *ours* (the official converters are for CNNs). The official
   conv form is there for :class:`~prunekit.models.convnets.ResNetLite` (``resnet56_state_dict_to_graph``):
   node = channel (the image's, every conv output's, the classes) with 8 features [BN γ, β, mean,
   var, shortcut-BN γ, β, mean, var] (defaults ``[1, 0, 0, 1, 1, 0, 0, 1]``, the FC bias in slot
   1), edge = an (out, in) channel pair with its 3x3 kernel (9 features; 1x1 shortcut convs and
   the FC zero-padded, the value at index 4), identity shortcuts as edges ``c -> c`` with centre
   1; a block's output nodes are the residual stream after it. Only the bijection and the
   metanetwork (``MetaGNN(node_dim=8, edge_dim=9)``) take it: meta-training and pruning here are
   for MLPs.
2. **The metanetwork** :class:`MetaGNN` (official ``nn/GNN.py::MyGNN``): node and edge encoders;
   ``layers`` rounds of a PNA-style convolution run on the edges and on the reversed edges (the
   reversed pass sees ``inv ⊙ e``, ``inv`` = ``+1`` on the first half of the channels and ``-1`` on
   the rest, and its edge update is added back multiplied by ``inv``), a shared LayerNorm (no
   affine) before each, residual updates; decoders ``LN -> Linear -> SiLU -> Linear`` added to the
   *input* features with a 0.01 scale, so that at initialisation the output is close to the
   input weights. The convolution's message into node ``i`` from ``j`` is ``lin2(h)_i ⊙ lin1(h)_j ⊙
   e_ij`` (messages flow from row 0 to row 1, PyG's ``source_to_target``), aggregated by mean,
   std, max and min (``scatter_reduce`` / ``index_add_``, no torch-geometric: std is
   ``sqrt(max(E[m²] − E[m]², 1e-5))``, set to 0 where it is ``<= sqrt(1e-5)``, and a node with no
   incoming edge aggregates to 0, as PyG does) and mixed by ``Linear(4h -> h)``; the edge update is
   ``lin3(h)[row 0] ⊙ lin4(h)[row 1] ⊙ e`` (``lin*`` = Linear + SiLU).
   **Scaled down**: ``hidden=32, layers=4`` by default (official ResNet-56 config: 64 and 8).
3. **Meta-training** (:func:`meta_train`, official ``utils/meta_train.py``): for each data model,
   ``W' = graph⁻¹(metanet(graph(W)))`` and the loss ``CE(f(x; W'), y) + R(W')`` on its batches
   (``torch.func.functional_call``: the gradient flows through ``W'`` into the metanetwork).
   ``R`` is Torch-Pruning's ``GroupNormPruner.regularize(alpha=16)`` written as a loss
   (:func:`group_norm_penalty`): per hidden layer, each neuron's importance ``imp_g`` is the square
   root of the mean, over the group's two members, of the summed squares of its row in ``W_i`` and
   its column in ``W_{i+1}`` (``GroupMagnitudeImportance(p=2, group_reduction="mean",
   normalizer="max")``), ``γ_g = α^{(imp_max − imp_g)/(imp_max − imp_min)}`` within the layer
   (detached), and ``R = reg/2 · Σ_g γ_g (‖row_g‖² + ‖col_g‖²)``, whose gradient is ``reg · γ_g ·
   w`` on every weight of the group (biases not regularised: ``bias=False`` officially). A
   weight matrix between two hidden layers gets both its row and its column terms, as in
   Torch-Pruning. AdamW (lr 1e-3, weight decay 5e-4), MultiStepLR ×0.1 at epoch 3, as officially.
4. **The pipeline** (:func:`meta_pruning`, official ``utils/pruning.py::pruning_one_step``):
   metanetwork forward -> fine-tune -> progressive global group-L2 pruning of hidden neurons until
   the FLOPs speed-up reaches ``speedup`` (:func:`progressive_prune`: ``prune_steps`` = 200 equal
   steps of the original hidden width, the lowest max-normalised importance removed globally each
   step, physically with :func:`~prunekit.models.convnets.remove_channels`) -> fine-tune. With
   ``metanet=None`` it is the official baseline: no metanetwork and **no first fine-tune**.

**Departures from the official code** (each a reduction of scale or a CPU choice):

- meta-training and pruning for MLPs only (officially ResNet/VGG/ViT channel graphs; the ResNetLite
  graph form is here, unused by the pipeline); hidden 32, 4 layers (officially 64, 8);
- meta-training reads ``batches_per_model`` batches per data model per step (officially every
  batch of a 500-image loader, the per-batch CE losses summed), 15 epochs in the demonstration
  instead of 100, data models trained 1 epoch instead of 200 and **not** pre-pruned to 1.32x;
- the officially hand-picked checkpoint (a binary search over accuracy-vs-speed-up plots of the
  saved epochs) is replaced by the last epoch;
- fine-tunes use prunekit's ``Trainer`` wrapper (:func:`~prunekit.training.train_batches`: AdamW,
  linear decay) for a given number of steps instead of SGD lr 0.01 with step milestones for 100 /
  140 epochs, and the last weights are kept (officially the best validation epoch after pruning);
- the progressive pruner is ours in plain torch (Torch-Pruning's ``GroupNormPruner`` with
  ``global_pruning=True, iterative_steps=200`` officially); the output Linear is never pruned (it is
  Torch-Pruning's ``ignored_layers``), nor are the input pixels.

**Measured in miniature** (``benchmarks/meta_pruning_fashion.py``, MLP 784-128-128-10 on
Fashion-MNIST, 10 data models, 15 meta-epochs): with the official ``reg=10`` the regulariser
dominates (R ≈ 3900 against CE ≈ 0.4); meta-training lowers R by a fifth while the rewritten
networks' CE rises from 0.40 to 0.66. After pruning and fine-tuning, the metanetwork arm beats the
official baseline (no metanetwork, no first fine-tune) by 1.3 pp of area under
accuracy-vs-speed-up (1.5-4x), but not a baseline given the same first fine-tune (−0.2 pp).

**Stage**: registered as ``after-training``: the method starts from a trained network (the data
models and the network to prune are trained first); the metanetwork is trained once, beforehand,
on other trained networks.

**Step and callback**: meta-training is a plain loop around :func:`meta_step` (one optimiser step
of the metanetwork on one data model; use it in your own loop). For ordinary training of a network
towards prunability, :func:`group_norm_loss_fn` gives the same regulariser as a ``loss_fn`` for
:func:`~prunekit.training.train_batches` (the transformers ``Trainer``) or any plain loop.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..models import convnets as C
from ..registry import register

_STD_EPS = 1e-5  # PyG's StdAggregation clamp


# ------------------------------------------------------------------ network <-> graph
@dataclass
class NetGraph:
    """A network as a graph: ``x`` ``(N, 1)`` node features (biases; 0 for the inputs),
    ``edge_index`` ``(2, E)`` (row 0 the output neuron, row 1 the input neuron), ``edge_attr``
    ``(E, 1)`` (the weights); ``sizes`` the MLP's layer sizes (the node layout)."""

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_attr: torch.Tensor
    sizes: tuple[int, ...]
    #: ``"mlp"`` (1 node and 1 edge feature) or ``"resnet"`` (8 and 9; ``sizes`` = (nodes, edges))
    kind: str = "mlp"

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_edges(self) -> int:
        return self.edge_attr.shape[0]


def _mlp(model: nn.Module) -> C.MLP:
    if not isinstance(model, C.MLP):
        raise UnsupportedModelError(
            f"meta pruning's training and pruning take prunekit's MLP (prunekit.models.convnets.MLP); "
            f"got {type(model).__name__} (a ResNetLite has a graph form, state_dict_to_graph, but no "
            "meta-training or pruning here)"
        )
    return model


def _edge_index(sizes: Sequence[int], device=None) -> torch.Tensor:
    """Row 0 the output neuron, row 1 the input neuron of every weight, row-major per Linear."""
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    parts = []
    for i in range(len(sizes) - 1):
        n_in, n_out = sizes[i], sizes[i + 1]
        out = torch.arange(n_out, device=device).repeat_interleave(n_in) + starts[i + 1]
        inp = torch.arange(n_in, device=device).repeat(n_out) + starts[i]
        parts.append(torch.stack([out, inp]))
    return torch.cat(parts, dim=1)


def state_dict_to_graph(model: nn.Module) -> NetGraph:
    """The graph of an :class:`~prunekit.models.convnets.MLP` or a
    :class:`~prunekit.models.convnets.ResNetLite` (see the module docstring); the features are
    taken from the live parameters (no detached copies: differentiable)."""
    if isinstance(model, C.ResNetLite):
        return _resnet_graph(model)
    model = _mlp(model)
    sizes = tuple(model.arch()["sizes"])
    p = model.layers[0].weight
    x = torch.cat(
        [torch.zeros(sizes[0], device=p.device, dtype=p.dtype)] + [lin.bias for lin in model.layers]
    )
    e = torch.cat([lin.weight.reshape(-1) for lin in model.layers])
    return NetGraph(x[:, None], _edge_index(sizes, p.device), e[:, None], sizes)


def graph_to_state_dict(graph: NetGraph, model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of :func:`state_dict_to_graph`: ``{"layers.i.weight", "layers.i.bias"}`` for
    ``model``'s architecture (which must match ``graph.sizes``), read from the graph's features by
    views (exact and differentiable; the input nodes' features are ignored). For a ResNetLite
    graph: every parameter and BN running statistic (``num_batches_tracked`` from ``model``)."""
    if isinstance(model, C.ResNetLite):
        return _resnet_state(graph, model)
    model = _mlp(model)
    if graph.kind != "mlp":
        raise ValueError(f"a {graph.kind!r} graph cannot be read back into an MLP")
    sizes = tuple(model.arch()["sizes"])
    if tuple(graph.sizes) != sizes:
        raise ValueError(f"the graph is of an MLP with sizes {graph.sizes}; the model has sizes {sizes}")
    n_w = sum(a * b for a, b in itertools.pairwise(sizes))
    if graph.x.shape != (sum(sizes), 1) or graph.edge_attr.shape != (n_w, 1):
        raise ValueError(
            f"graph features of shapes {tuple(graph.x.shape)} / {tuple(graph.edge_attr.shape)}; the MLP "
            f"{sizes} needs ({sum(sizes)}, 1) node and ({n_w}, 1) edge features"
        )
    out = {}
    node, edge = sizes[0], 0
    for i in range(len(sizes) - 1):
        n_in, n_out = sizes[i], sizes[i + 1]
        out[f"layers.{i}.weight"] = graph.edge_attr[edge : edge + n_in * n_out, 0].view(n_out, n_in)
        out[f"layers.{i}.bias"] = graph.x[node : node + n_out, 0]
        edge += n_in * n_out
        node += n_out
    return out


# ------------------------------------------------------------------ the conv form (ResNetLite)
_BN_DEFAULT = (1.0, 0.0, 0.0, 1.0)  # γ, β, running mean, running var of an absent BN


def _bn_feats(bn: nn.BatchNorm2d | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """``(n, 4)``: a BN's [γ, β, mean, var] per channel, or the defaults."""
    if bn is None:
        return like.new_tensor(_BN_DEFAULT).expand(n, 4)
    return torch.stack([bn.weight, bn.bias, bn.running_mean, bn.running_var], dim=1)


def _kernel_feats(w: torch.Tensor) -> torch.Tensor:
    """``(out*in, 9)``: a 3x3 kernel flattened, or a 1x1 kernel / a Linear weight at index 4."""
    o, i = w.shape[:2]
    if w.dim() == 4 and w.shape[2:] == (3, 3):
        return w.reshape(o * i, 9)
    if w.dim() == 2 or w.shape[2:] == (1, 1):
        flat = w.reshape(o * i, 1)
        z = flat.new_zeros(o * i, 4)
        return torch.cat([z, flat, z], dim=1)
    raise UnsupportedModelError(f"a kernel of shape {tuple(w.shape)}: only 3x3 and 1x1 have a graph form")


def _pairs(out0: int, n_out: int, in0: int, n_in: int, device) -> torch.Tensor:
    out = torch.arange(n_out, device=device).repeat_interleave(n_in) + out0
    inp = torch.arange(n_in, device=device).repeat(n_out) + in0
    return torch.stack([out, inp])


def _resnet_walk(model: C.ResNetLite):
    """The graph's layout: ``(nodes, edges)``; nodes: ``(count, bn, shortcut bn, bias)`` blocks in
    order; edges: ``(tensor name or None for an identity shortcut, first out node, first in node,
    out count, in count)``."""
    nodes, edges = [], []
    n = 0

    def add(count, bn=None, sbn=None, bias=None):
        nonlocal n
        nodes.append((count, bn, sbn, bias))
        n += count
        return n - count

    inp = add(model.stem.in_channels)
    cur = add(model.stem.out_channels, "stem_bn")
    edges.append(("stem.weight", cur, inp, model.stem.out_channels, model.stem.in_channels))
    for s, stage in enumerate(model.stages):
        for k, blk in stage.items():
            p = f"stages.{s}.{k}"
            c_in, c_mid, c_out = blk.conv1.in_channels, blk.conv1.out_channels, blk.conv2.out_channels
            mid = add(c_mid, f"{p}.bn1")
            out = add(c_out, f"{p}.bn2", f"{p}.shortcut.1" if blk.shortcut is not None else None)
            edges.append((f"{p}.conv1.weight", mid, cur, c_mid, c_in))
            edges.append((f"{p}.conv2.weight", out, mid, c_out, c_mid))
            if blk.shortcut is not None:
                edges.append((f"{p}.shortcut.0.weight", out, cur, c_out, c_in))
            else:  # the identity: channel c to channel c, centre 1
                edges.append((None, out, cur, c_out, c_in))
            cur = out
    cls = add(model.fc.out_features, bias="fc.bias")
    edges.append(("fc.weight", cls, cur, model.fc.out_features, model.fc.in_features))
    return nodes, edges


def _resnet_graph(model: C.ResNetLite) -> NetGraph:
    """Nodes = channels (the image's, every conv output's, the classes) with 8 features [BN γ, β,
    mean, var, shortcut-BN γ, β, mean, var] (defaults [1, 0, 0, 1, 1, 0, 0, 1]; the FC bias in slot
    1); edges = (out, in) channel pairs of each conv with its 3x3 kernel (9 features; 1x1 convs and
    the FC at index 4), an identity shortcut as edges ``c -> c`` with centre 1 (official
    ``resnet56_state_dict_to_graph``)."""
    ps = dict(model.named_parameters()) | dict(model.named_buffers())
    like = model.fc.weight
    nodes, edges = _resnet_walk(model)
    xs = []
    for count, bn, sbn, bias in nodes:
        a = _bn_feats(model.get_submodule(bn) if bn else None, count, like)
        b = _bn_feats(model.get_submodule(sbn) if sbn else None, count, like)
        if bias is not None:
            a = torch.cat([a[:, :1], ps[bias][:, None], a[:, 2:]], dim=1)
        xs.append(torch.cat([a, b], dim=1))
    eis, eas = [], []
    for name, o0, i0, no, ni in edges:
        if name is None:
            idx = torch.arange(no, device=like.device)
            eis.append(torch.stack([idx + o0, idx + i0]))
            centre = like.new_zeros(no, 9)
            centre[:, 4] = 1.0
            eas.append(centre)
        else:
            eis.append(_pairs(o0, no, i0, ni, like.device))
            eas.append(_kernel_feats(ps[name]))
    x, ea = torch.cat(xs), torch.cat(eas)
    return NetGraph(x, torch.cat(eis, dim=1), ea, (x.shape[0], ea.shape[0]), kind="resnet")


def _resnet_state(graph: NetGraph, model: C.ResNetLite) -> dict[str, torch.Tensor]:
    if graph.kind != "resnet":
        raise ValueError(f"a {graph.kind!r} graph cannot be read back into a ResNetLite")
    nodes, edges = _resnet_walk(model)
    n_nodes = sum(c for c, *_ in nodes)
    n_edges = sum(no if name is None else no * ni for name, _, _, no, ni in edges)
    if graph.x.shape != (n_nodes, 8) or graph.edge_attr.shape != (n_edges, 9):
        raise ValueError(
            f"graph features of shapes {tuple(graph.x.shape)} / {tuple(graph.edge_attr.shape)}; this "
            f"ResNetLite needs ({n_nodes}, 8) node and ({n_edges}, 9) edge features"
        )
    ps = dict(model.named_parameters()) | dict(model.named_buffers())
    out = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    start = 0
    for count, bn, sbn, bias in nodes:
        f = graph.x[start : start + count]
        for mod, cols in ((bn, f[:, :4]), (sbn, f[:, 4:])):
            if mod:
                for j, key in enumerate(("weight", "bias", "running_mean", "running_var")):
                    out[f"{mod}.{key}"] = cols[:, j]
        if bias:
            out[bias] = f[:, 1]
        start += count
    start = 0
    for name, _, _, no, ni in edges:
        if name is None:
            start += no
            continue
        e = graph.edge_attr[start : start + no * ni]
        shape = ps[name].shape
        out[name] = e.view(shape) if len(shape) == 4 and shape[2:] == (3, 3) else e[:, 4].reshape(shape)
        start += no * ni
    return out


# ------------------------------------------------------------------ the metanetwork
def aggregate(msg: torch.Tensor, index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``[mean, std, max, min]`` of the messages ``msg`` ``(E, h)`` into their target nodes
    ``index`` ``(E,)``: ``(num_nodes, 4h)``. As PyG's multi-aggregation: std =
    ``sqrt(clamp(E[m²] − E[m]², 1e-5))``, 0 where that is ``<= sqrt(1e-5)``; a node with no
    message gets 0 everywhere."""
    h = msg.shape[1]
    cnt = torch.bincount(index, minlength=num_nodes).clamp(min=1).to(msg.dtype)[:, None]
    zeros = msg.new_zeros(num_nodes, h)
    mean = zeros.index_add(0, index, msg) / cnt
    sq = zeros.index_add(0, index, msg * msg) / cnt
    std = (sq - mean * mean).clamp(min=_STD_EPS).sqrt()
    std = std.masked_fill(std <= math.sqrt(_STD_EPS), 0.0)
    idx = index[:, None].expand(-1, h)
    mx = zeros.scatter_reduce(0, idx, msg, "amax", include_self=False)
    mn = zeros.scatter_reduce(0, idx, msg, "amin", include_self=False)
    return torch.cat([mean, std, mx, mn], dim=1)


def _lin_silu(h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(h, h), nn.SiLU())


class PNAConv(nn.Module):
    """One message-passing layer of the metanetwork (official ``nn/GNN.py::PNAConv``): returns the
    node update ``Linear(4h -> h)([mean, std, max, min] of lin2(h)_i ⊙ lin1(h)_j ⊙ e_ij)`` at the
    row-1 node ``i`` and the edge update ``lin3(h)[row 0] ⊙ lin4(h)[row 1] ⊙ e``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lin1, self.lin2, self.lin3, self.lin4 = (_lin_silu(hidden) for _ in range(4))
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(
        self, h: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src, dst = edge_index[0], edge_index[1]
        msg = self.lin2(h)[dst] * self.lin1(h)[src] * e
        node = self.down(aggregate(msg, dst, h.shape[0]))
        edge = self.lin3(h)[src] * self.lin4(h)[dst] * e
        return node, edge


def _decoder(hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(hidden, elementwise_affine=False), nn.Linear(hidden, hidden), nn.SiLU(),
        nn.Linear(hidden, out),
    )  # fmt: skip


class MetaGNN(nn.Module):
    """The graph metanetwork (official ``MyGNN``; see the module docstring). ``forward(x,
    edge_index, edge_attr)`` returns ``(x + res_scale·nodeDec(h), edge_attr +
    res_scale·edgeDec(e))``, the new node and edge features. Defaults scaled down for a CPU:
    ``hidden=32, layers=4`` (official ResNet-56: 64, 8); ``node_dim = edge_dim = 1`` for the MLP
    graph. ``seed`` fixes the initialisation (the global RNG is left as it was)."""

    def __init__(
        self, hidden: int = 32, layers: int = 4, node_dim: int = 1, edge_dim: int = 1,
        res_scale: float = 0.01, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        for name, v in (
            ("hidden", hidden),
            ("layers", layers),
            ("node_dim", node_dim),
            ("edge_dim", edge_dim),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        if hidden < 2:
            raise ValueError(f"hidden must be >= 2 (the sign vector splits it in halves); got {hidden}")
        self.res_scale = float(res_scale)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.node_enc = nn.Linear(node_dim, hidden)
            self.edge_enc = nn.Linear(edge_dim, hidden)
            self.convs = nn.ModuleList(PNAConv(hidden) for _ in range(layers))
            self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
            self.node_dec = _decoder(hidden, node_dim)
            self.edge_dec = _decoder(hidden, edge_dim)
        inv = torch.cat([torch.ones(hidden // 2), -torch.ones((hidden + 1) // 2)])
        self.register_buffer("inv", inv, persistent=False)
        self.config = {"hidden": hidden, "layers": layers, "node_dim": node_dim, "edge_dim": edge_dim,
                       "res_scale": self.res_scale}  # fmt: skip

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.node_enc(x)
        e = self.edge_enc(edge_attr)
        rev = edge_index.flip(0)
        for conv in self.convs:
            n1, e1 = conv(self.norm(h), edge_index, e)
            n2, e2 = conv(self.norm(h), rev, self.inv * e)
            h = h + n1 + n2
            e = e + e1 + self.inv * e2
        return x + self.res_scale * self.node_dec(h), edge_attr + self.res_scale * self.edge_dec(e)

    def rewrite(self, graph: NetGraph) -> NetGraph:
        """The graph with the metanetwork's new features (same layout)."""
        x, e = self(graph.x, graph.edge_index, graph.edge_attr)
        return NetGraph(x, graph.edge_index, e, graph.sizes, graph.kind)


def apply_metanet(metanet: MetaGNN, model: nn.Module) -> nn.Module:
    """A new network of ``model``'s architecture whose weights are the metanetwork's output on
    ``model``'s graph (no gradient; ``model`` unchanged; the metanetwork's mode is restored)."""
    was = metanet.training
    metanet.eval()
    try:
        with torch.no_grad():
            g = state_dict_to_graph(model)
            dev = next(metanet.parameters()).device
            g = NetGraph(g.x.to(dev), g.edge_index.to(dev), g.edge_attr.to(dev), g.sizes, g.kind)
            new_state = graph_to_state_dict(metanet.rewrite(g), model)
    finally:
        metanet.train(was)
    out = copy.deepcopy(model)
    out.load_state_dict({k: v.to(model.layers[0].weight.device) for k, v in new_state.items()})
    return out


# ------------------------------------------------------------------ group importance and R
def _layer_weights(state: dict[str, torch.Tensor] | nn.Module) -> list[torch.Tensor]:
    if isinstance(state, nn.Module):
        return [lin.weight for lin in _mlp(state).layers]
    n = len([k for k in state if k.endswith(".weight")])
    return [state[f"layers.{i}.weight"] for i in range(n)]


def group_importance(state: dict[str, torch.Tensor] | nn.Module) -> list[torch.Tensor]:
    """Per hidden layer ``i`` (group ``hidden.i``), each neuron's importance as Torch-Pruning's
    ``GroupNormPruner`` uses it: ``sqrt(m_j / max_j m_j)`` with ``m_j = (‖W_i[j, :]‖² +
    ‖W_{i+1}[:, j]‖²) / 2`` (``GroupMagnitudeImportance(p=2, "mean", normalizer="max")``, then the
    square root of ``regularize``). ``state``: an MLP or its ``{"layers.i.weight": ...}``. Detached."""
    ws = [w.detach() for w in _layer_weights(state)]
    out = []
    for i in range(len(ws) - 1):
        m = (ws[i].pow(2).sum(1) + ws[i + 1].pow(2).sum(0)) / 2
        out.append((m / m.max().clamp(min=torch.finfo(m.dtype).tiny)).sqrt())
    return out


def group_gammas(state: dict[str, torch.Tensor] | nn.Module, alpha: float = 16.0) -> list[torch.Tensor]:
    """``γ_g = α^{(imp_max − imp_g)/(imp_max − imp_min)}`` per hidden layer (1 for the most
    important neuron, ``α`` for the least); all ones when a layer's importances are all equal."""
    out = []
    for imp in group_importance(state):
        span = imp.max() - imp.min()
        if float(span) == 0.0:
            out.append(torch.ones_like(imp))
        else:
            out.append(alpha ** ((imp.max() - imp) / span))
    return out


def group_norm_penalty(
    state: dict[str, torch.Tensor] | nn.Module, *, alpha: float = 16.0, reg: float = 10.0
) -> torch.Tensor:
    """``R = reg/2 · Σ_g γ_g (‖W_i[g, :]‖² + ‖W_{i+1}[:, g]‖²)`` over every hidden neuron ``g`` (γ
    detached, :func:`group_gammas`): its gradient is ``reg · γ_g · w`` on each weight of the group,
    Torch-Pruning's ``GroupNormPruner(reg).regularize(model, alpha)`` (biases not regularised)."""
    ws = _layer_weights(state)
    gammas = group_gammas(state, alpha)
    total = ws[0].new_zeros(())
    for i, g in enumerate(gammas):
        total = total + (g * ws[i].pow(2).sum(1)).sum() + (g * ws[i + 1].pow(2).sum(0)).sum()
    return 0.5 * reg * total


def group_norm_loss_fn(*, alpha: float = 16.0, reg: float = 1e-4):
    """The group-norm regulariser as a ``loss_fn(model, inputs, outputs, step)`` for
    :func:`~prunekit.training.train_batches` (the transformers ``Trainer``) or a plain loop
    (``loss = out.loss + fn(model, batch, out, step)``): sparsity training of an MLP towards group
    pruning, the gradient Torch-Pruning's ``regularize`` adds. (The default ``reg`` is for ordinary
    training, not the meta-training's 10.)"""
    _check_positive(alpha=alpha, reg=reg)

    def fn(model, inputs=None, outputs=None, step=None):
        return {"group_norm": group_norm_penalty(model, alpha=alpha, reg=reg)}

    return fn


def _check_positive(**kw) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number > 0; got {v!r}")


def _check_int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")


# ------------------------------------------------------------------ meta-training
def meta_loss(
    metanet: MetaGNN, model: nn.Module, batches: Sequence[dict], *, alpha: float = 16.0, reg: float = 10.0
) -> dict[str, torch.Tensor]:
    """``{"ce": Σ_b CE(f(x_b; W'), y_b), "reg": R(W')}`` with ``W' = graph⁻¹(metanet(graph(W)))``,
    the network called by ``torch.func.functional_call`` (differentiable in the metanetwork).
    The CE losses of the batches are summed, as the official loop sums their backward passes."""
    from torch.func import functional_call

    g = state_dict_to_graph(model)
    g = NetGraph(g.x.detach(), g.edge_index, g.edge_attr.detach(), g.sizes, g.kind)
    state = graph_to_state_dict(metanet.rewrite(g), model)
    ce = g.x.new_zeros(())
    for b in batches:
        out = functional_call(model, state, (), {"pixel_values": b["pixel_values"]})
        ce = ce + F.cross_entropy(out.logits, b["labels"])
    return {"ce": ce, "reg": group_norm_penalty(state, alpha=alpha, reg=reg)}


def meta_step(
    metanet: MetaGNN, optimizer: torch.optim.Optimizer, model: nn.Module, batches: Sequence[dict], *,
    alpha: float = 16.0, reg: float = 10.0,
) -> dict[str, float]:  # fmt: skip
    """One optimiser step of the metanetwork on one data model (:func:`meta_loss` backward, then
    ``optimizer.step()``); returns the float terms. Use it in any loop."""
    optimizer.zero_grad(set_to_none=True)
    terms = meta_loss(metanet, model, batches, alpha=alpha, reg=reg)
    sum(terms.values()).backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def meta_train(
    data_models: Sequence[nn.Module],
    batches: Sequence[dict],
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    milestones: Sequence[int] = (3,),
    lr_gamma: float = 0.1,
    alpha: float = 16.0,
    reg: float = 10.0,
    batches_per_model: int = 1,
    metanet: MetaGNN | None = None,
    hidden: int = 32,
    layers: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> tuple[MetaGNN, list[dict]]:
    """Train a metanetwork (a new :class:`MetaGNN` ``(hidden, layers, seed)`` unless ``metanet``
    is given) on trained MLPs ``data_models``: ``epochs`` passes over the models, each one
    :func:`meta_step` on the next ``batches_per_model`` batches of ``batches`` (cycled); AdamW
    ``lr`` / ``weight_decay``, the learning rate ×``lr_gamma`` at each epoch in ``milestones``
    (official: 1e-3, 5e-4, epoch 3, ×0.1). Returns ``(metanet, history)``, ``history`` one dict per
    step ``{"epoch", "model", "ce", "reg"}``. The data models are not changed."""
    if not data_models:
        raise ValueError("meta_train needs at least one data model; got none")
    if not batches:
        raise ValueError("meta_train needs at least one batch; got none")
    for m in data_models:
        _mlp(m)
    _check_int("epochs", epochs, 1)
    _check_int("batches_per_model", batches_per_model, 1)
    _check_positive(lr=lr, alpha=alpha, reg=reg)
    if metanet is None:
        metanet = MetaGNN(hidden=hidden, layers=layers, seed=seed)
    opt = torch.optim.AdamW(metanet.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=lr_gamma)
    metanet.train()
    history, k = [], 0
    for epoch in range(epochs):
        for i, model in enumerate(data_models):
            bs = [batches[(k + j) % len(batches)] for j in range(batches_per_model)]
            k += batches_per_model
            t = meta_step(metanet, opt, model, bs, alpha=alpha, reg=reg)
            history.append({"epoch": epoch, "model": i, **t})
            if progress:
                print(f"meta epoch {epoch} model {i}: ce {t['ce']:.4f} reg {t['reg']:.4f}", flush=True)
        sched.step()
    metanet.eval()
    return metanet, history


# ------------------------------------------------------------------ pruning
def mlp_flops(model: nn.Module) -> int:
    """Multiply-accumulates per sample of an MLP (:func:`~prunekit.models.convnets.count_flops`)."""
    return C.count_flops(model, (1, 1, 1, _mlp(model).layers[0].in_features))


def progressive_prune(model: nn.Module, speedup: float, *, steps: int = 200) -> dict:
    """Remove hidden neurons of the MLP ``model`` **in place**, ``ceil(N₀ / steps)`` at a time
    (``N₀`` the original number of hidden neurons), those of lowest max-normalised group importance
    (:func:`group_importance`) across all hidden layers at once (global pruning; at least one
    neuron stays per layer), recomputing the importances after each step, until the FLOPs
    speed-up reaches ``speedup`` or nothing is left to remove. Returns ``{"speedup", "steps",
    "widths"}``."""
    _mlp(model)
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not speedup >= 1:
        raise ValueError(f"speedup must be a number >= 1 (FLOPs before / after); got {speedup!r}")
    _check_int("steps", steps, 1)
    base = mlp_flops(model)
    n0 = sum(g.width for g in C.groups(model).values())
    per_step = max(1, math.ceil(n0 / steps))
    done, cur = 0, 1.0
    while cur < speedup:
        gs = list(C.groups(model))
        imps = group_importance(model)
        removable = [i.numel() - 1 for i in imps]
        if sum(removable) == 0:
            break
        flat = torch.cat(
            [imp if r > 0 else torch.full_like(imp, math.inf) for imp, r in zip(imps, removable, strict=True)]
        )
        layer_of = torch.cat([torch.full((imp.numel(),), i) for i, imp in enumerate(imps)])
        order = torch.argsort(flat, stable=True)
        # in ascending order, a neuron's rank within its layer; beyond the layer's cap it stays
        lo = layer_of[order]
        rank = F.one_hot(lo, len(imps)).cumsum(0).gather(1, lo[:, None]).squeeze(1) - 1
        ok = (rank < torch.tensor(removable)[lo]) & torch.isfinite(flat[order])
        chosen = order[ok][:per_step]
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        drop[chosen] = True
        keep, start = {}, 0
        for name, imp in zip(gs, imps, strict=True):
            d = drop[start : start + imp.numel()]
            keep[name] = (~d).nonzero().flatten()
            start += imp.numel()
        C.remove_channels(model, keep)
        done += 1
        cur = base / mlp_flops(model)
    return {"speedup": cur, "steps": done, "widths": C.group_widths(model)}


# ------------------------------------------------------------------ the pipeline
@dataclass
class MetaPruningReport:
    """Per stage (``"input"``, ``"metanet"``, ``"finetuned"``, ``"pruned"``, ``"final"``): the
    parameters, multiply-accumulates per sample and the accuracy on ``eval_batches`` (``None``
    without them); ``speedup`` the FLOPs speed-up reached, ``widths`` the final hidden widths."""

    stages: dict[str, dict] = field(default_factory=dict)
    speedup: float = 1.0
    prune_steps: int = 0
    widths: dict[str, int] = field(default_factory=dict)
    used_metanet: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def batch_accuracy(model: nn.Module, batches: Sequence[dict]) -> float:
    """Top-1 accuracy of ``model`` on ``batches`` (eval mode, no gradient; the mode is restored)."""
    was, correct, total = model.training, 0, 0
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                logits = model(pixel_values=b["pixel_values"]).logits
                correct += int((logits.argmax(-1) == b["labels"]).sum())
                total += len(b["labels"])
    finally:
        model.train(was)
    return correct / max(total, 1)


def meta_pruning(
    model: nn.Module,
    metanet: MetaGNN | None,
    batches: Sequence[dict],
    *,
    speedup: float = 2.0,
    finetune_steps: int = 100,
    final_steps: int = 100,
    lr: float = 1e-3,
    prune_steps: int = 200,
    seed: int = 0,
    eval_batches: Sequence[dict] | None = None,
    progress: bool = False,
) -> tuple[nn.Module, MetaPruningReport]:
    """Meta Pruning's pipeline on a trained MLP (``model`` is left unchanged): the metanetwork's
    rewrite (:func:`apply_metanet`) -> ``finetune_steps`` of fine-tuning on ``batches`` ->
    :func:`progressive_prune` to ``speedup`` (FLOPs before / after) in ``prune_steps`` steps ->
    ``final_steps`` of fine-tuning. Fine-tunes are :func:`~prunekit.training.train_batches` (the
    transformers ``Trainer``; AdamW ``lr``, linear decay, ``seed``). ``metanet=None`` is the
    official baseline: no rewrite and **no first fine-tune**. ``eval_batches``: labelled batches
    for the report's accuracies. Returns ``(pruned network, MetaPruningReport)``."""
    from .loop import train_batches

    _mlp(model)
    if not batches:
        raise ValueError("meta_pruning needs at least one training batch; got none")
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not speedup >= 1:
        raise ValueError(f"speedup must be a number >= 1 (FLOPs before / after); got {speedup!r}")
    _check_int("finetune_steps", finetune_steps, 0)
    _check_int("final_steps", final_steps, 0)
    _check_int("prune_steps", prune_steps, 1)
    _check_positive(lr=lr)
    report = MetaPruningReport(used_metanet=metanet is not None)

    def record(stage: str, net: nn.Module) -> None:
        report.stages[stage] = {
            "params": C.count_params(net), "macs": mlp_flops(net),
            "accuracy": batch_accuracy(net, eval_batches) if eval_batches else None,
        }  # fmt: skip

    record("input", model)
    if metanet is not None:
        net = apply_metanet(metanet, model)
        record("metanet", net)
        if finetune_steps:
            train_batches(net, batches, steps=finetune_steps, lr=lr, seed=seed, progress=progress)
            record("finetuned", net)
    else:
        net = copy.deepcopy(model)
    res = progressive_prune(net, speedup, steps=prune_steps)
    report.speedup, report.prune_steps, report.widths = res["speedup"], res["steps"], res["widths"]
    record("pruned", net)
    if final_steps:
        train_batches(net, batches, steps=final_steps, lr=lr, seed=seed, progress=progress)
    record("final", net)
    return net, report


@register(
    "meta_pruning",
    family="training",
    paper="Meta Pruning via Graph Metanetworks: A Universal Meta Learning Framework for Network Pruning",
    stages=("after-training",),
    signals=("metanetwork(weights graph)", "group_l2_norm"),
    trains=True,
    summary="a graph metanetwork rewrites a trained MLP to be easier to prune; then group-L2 neuron pruning",
)
@dataclass
class MetaPruning:
    """Meta Pruning's pipeline options as a registry method: ``MetaPruning(speedup=3.0)(model,
    metanet, batches)`` is :func:`meta_pruning` (train the metanetwork first with
    :func:`meta_train`)."""

    docs_from: ClassVar[str] = "prunekit.training.meta_pruning"
    usage: ClassVar[str] = (
        "metanet, hist = prunekit.training.meta_train(data_models, batches, epochs=15)\n"
        "net, report = prunekit.training.meta_pruning(model, metanet, batches{opts})"
    )
    taxonomy: ClassVar[dict] = {
        "which": "weights: structured (neurons/channels)",
        "speedup": "universal (smaller dense tensors)",
        "how": "learned (a graph metanetwork makes the net easier to prune; group L2)",
    }
    speedup: float = 2.0
    finetune_steps: int = 100
    final_steps: int = 100
    lr: float = 1e-3
    prune_steps: int = 200
    seed: int = 0

    def __call__(self, model: nn.Module, metanet: MetaGNN | None, batches, **kw):
        return meta_pruning(model, metanet, batches, **asdict(self), **kw)


__all__ = [
    "MetaGNN",
    "MetaPruning",
    "MetaPruningReport",
    "NetGraph",
    "PNAConv",
    "aggregate",
    "apply_metanet",
    "batch_accuracy",
    "graph_to_state_dict",
    "group_gammas",
    "group_importance",
    "group_norm_loss_fn",
    "group_norm_penalty",
    "meta_loss",
    "meta_pruning",
    "meta_step",
    "meta_train",
    "mlp_flops",
    "progressive_prune",
    "state_dict_to_graph",
]
