"""A DG-Net stage: the blocks of one CNN stage wired as a complete DAG, routed per image.

Node numbering (the rows and columns of the adjacency matrix):

* node 0, the **input node**: the stage input. It only distributes features.
* nodes 1..N, the **blocks** (a torchvision BasicBlock, Bottleneck, InvertedResidual
  or ResBottleneckBlock, used unchanged).
* node N+1, the **output node**: it only gathers, by weighted sum, what the blocks send it.

Readings of the paper (see docs/dgnet.md for the reasoning and the parameter counts):

* The first block is stride-2 and/or changes channels, so the stage input has a
  different shape from every later node. The input node therefore feeds block 1
  alone, through a fixed edge of weight 1; block 1 onwards form a complete DAG (each
  block feeds every later block and the output node), so every routed edge joins
  tensors of the same shape.
* Each block has a router (GAP → FC → sigmoid) with one output per routed edge:
  FC(C → number of later blocks + 1). The input node has no router (its only edge is
  fixed) and the output node has none (it has no successors).
* Each block has a learnable threshold τ for its output edges.

Per image, a block runs only if at least one of its input edges is open; it is then
computed on the sub-batch of images for which it runs, so a batch gives the same
result as each image alone. A block that did not run sends nothing: its output
edges are closed for that image.

After each forward the stage keeps, detached, the B×(N+2)×(N+2) matrix of gated edge
weights (``adjacency[b, target, source]``, the paper's buffer) and which nodes ran.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dgserve.connectivity import StageConnectivity, StageGraph
from dgserve.models.dgnet.routing import DEFAULT_TEMPERATURE, Router, threshold_edges

DEFAULT_TAU = 0.1


class DGStage(nn.Module):
    def __init__(
        self,
        blocks: Sequence[tuple[str, nn.Module]],
        channels: int,
        tau_init: float = DEFAULT_TAU,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a stage needs at least one block")
        # Blocks keep the names they had in the torchvision model (e.g. "0", "block2-1"),
        # so a torchvision state dict maps onto a DG-Net key for key.
        self.block_names = [name for name, _ in blocks]
        for name, block in blocks:
            self.add_module(name, block)
        n = len(blocks)
        self.routers = nn.ModuleList(Router(channels, n - k) for k in range(n))
        self.tau = nn.Parameter(torch.full((n,), float(tau_init)))
        self.temperature = temperature
        self.channels = channels
        self.last_adjacency: Tensor | None = None
        self.last_executed: Tensor | None = None
        self._gated_edges: list[Tensor] = []

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @property
    def node_names(self) -> list[str]:
        return ["input", *self.block_names, "output"]

    @property
    def possible_edges(self) -> int:
        """Routed edges: each block to every later block and to the output node."""
        n = self.num_blocks
        return n * (n + 1) // 2

    def blocks(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.block_names]

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        n = self.num_blocks
        outputs: list[Tensor | None] = []  # outputs[k] is block k+1's output (zeros where skipped)
        gated: list[Tensor] = []  # gated[k]: B × (n-k) weights of block k+1 → blocks k+2.., output
        executed: list[Tensor] = []
        prune = not torch.is_grad_enabled()
        for k, (block, router) in enumerate(zip(self.blocks(), self.routers, strict=True)):
            if k == 0:
                inp, runs = x, torch.ones(batch, dtype=torch.bool, device=x.device)
            else:
                weights = [g[:, k - i - 1] for i, g in enumerate(gated)]
                runs = torch.stack([w > 0 for w in weights], dim=1).any(dim=1)
                inp = _weighted_sum(weights, outputs, prune)
            executed.append(runs)
            out, edges = self._run_node(block, router, self.tau[k], inp, runs)
            outputs.append(out)
            gated.append(edges)
        result = _weighted_sum([g[:, -1] for g in gated], outputs, prune)
        if result is None:  # every edge into the output node closed for every image
            first = outputs[0]
            assert first is not None  # block 1 always runs: its input edge is fixed open
            result = torch.zeros_like(first)
        self._record(gated, executed, batch, x.device)
        return result

    def _run_node(
        self, block: nn.Module, router: nn.Module, tau: Tensor, inp: Tensor | None, runs: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        batch = runs.shape[0]
        num_out = router.fc.out_features
        if inp is None or not bool(runs.any()):
            return None, runs.new_zeros((batch, num_out), dtype=self.tau.dtype)
        if bool(runs.all()):
            out = block(inp)
            return out, threshold_edges(router(out), tau, self.temperature)
        # Run the block on the images that reach it, and only on those.
        idx = runs.nonzero().squeeze(1)
        sub_out = block(inp.index_select(0, idx))
        sub_edges = threshold_edges(router(sub_out), tau, self.temperature)
        out = sub_out.new_zeros((batch, *sub_out.shape[1:])).index_copy(0, idx, sub_out)
        edges = sub_edges.new_zeros((batch, num_out)).index_copy(0, idx, sub_edges)
        return out, edges

    def _record(self, gated: list[Tensor], executed: list[Tensor], batch: int, device: torch.device) -> None:
        n = self.num_blocks
        adj = torch.zeros(batch, n + 2, n + 2, device=device)
        adj[:, 1, 0] = 1.0
        for k, g in enumerate(gated):
            adj[:, k + 2 :, k + 1] = g.detach().float()
        ran = torch.ones(batch, n + 2, dtype=torch.bool, device=device)
        ran[:, 1 : n + 1] = torch.stack(executed, dim=1)
        ran[:, n + 1] = (adj[:, n + 1, 1:] > 0).any(dim=1)
        self.last_adjacency = adj
        self.last_executed = ran
        self._gated_edges = gated if torch.is_grad_enabled() else []

    # --- inspection -------------------------------------------------------------

    def image_connectivity(self, name: str) -> list[StageConnectivity]:
        if self.last_adjacency is None or self.last_executed is None:
            raise RuntimeError(f"stage {name} has not run yet")
        adj = self.last_adjacency.cpu()
        open_edges = (adj[:, 2:, 1:] > 0).sum(dim=(1, 2)).tolist()
        thresholds: list[float | None] = [None, *self.tau.detach().cpu().tolist(), None]
        nodes = self.node_names
        # One tolist() per batch, not per image: on a small model this conversion is a
        # visible share of the time the worker holds the GIL.
        return [
            StageConnectivity(
                stage=name,
                nodes=nodes,
                adjacency=matrix,
                thresholds=thresholds,
                executed=ran,
                open_edges=int(opened),
                possible_edges=self.possible_edges,
            )
            for matrix, ran, opened in zip(adj.tolist(), self.last_executed.cpu().tolist(), open_edges, strict=True)
        ]

    def graph_description(self, name: str) -> StageGraph:
        return StageGraph(name=name, nodes=self.node_names, possible_edges=self.possible_edges)

    def gated_edge_weights(self) -> list[Tensor]:
        """The last training forward's gated edge weights, still attached to the graph."""
        return self._gated_edges

    # --- wiring ---------------------------------------------------------------

    @torch.no_grad()
    def pin_chain(self) -> None:
        """Wire the stage as the plain backbone: block k → block k+1, last block → output.

        Used to import a static torchvision model: with every router pinned this way
        the DG-Net computes exactly what the torchvision model computes.
        """
        for router in self.routers:
            edges = torch.zeros(router.fc.out_features, dtype=torch.bool)
            edges[0] = True  # the first routed edge of block k goes to block k+1 (or the output)
            router.pin(edges.to(router.fc.bias.device))
        self.tau.fill_(0.5)


def _weighted_sum(weights: list[Tensor], outputs: list[Tensor | None], prune: bool) -> Tensor | None:
    """Σ_i w_i · x_i over computed sources, per image.

    With ``prune`` (no gradient needed) a source whose edge is closed for every image
    of the batch is left out: it would add exactly zero.
    """
    total: Tensor | None = None
    for w, out in zip(weights, outputs, strict=True):
        if out is None or (prune and not bool((w > 0).any())):
            continue
        term = w.to(out.dtype).view(-1, *([1] * (out.dim() - 1))) * out
        total = term if total is None else total + term
    return total


def edge_l1(model: nn.Module) -> Tensor:
    """Mean gated edge weight over every DG-Net stage of the last training forward.

    Added to the loss (times a coefficient) it encourages sparse connectivity, so that
    thresholds actually close edges (as TopoNet and DG-Net do).
    """
    terms = [g.mean() for m in model.modules() if isinstance(m, DGStage) for g in m.gated_edge_weights()]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()
