"""A DG-Net stage: the blocks of one CNN stage wired as a DAG (complete by default), routed per image.

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

The wiring (``wiring.py``) says which routed edges exist: the complete DAG above, or
a fixed random DAG (RandWire's baselines), whose absent edges are never open. The
routing says what weights them: a router per block and image (``"dynamic"``, the
paper's DG-Net) or one learned weight per edge for every image (``"static"``).

Per image, a block runs only if at least one of its input edges is open; it is then
computed on the sub-batch of images for which it runs, so a batch gives the same
result as each image alone. A block that did not run sends nothing: its output
edges are closed for that image.

After each forward the stage keeps, detached, the B×(N+2)×(N+2) matrix of gated edge
weights (``adjacency[b, target, source]``, the paper's buffer) and which nodes ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dgserve.connectivity import StageConnectivity, StageGraph
from dgserve.models.dgnet.routing import DEFAULT_TEMPERATURE, Router, StaticRouter, make_router, threshold_edges
from dgserve.models.dgnet.wiring import StageWiring, complete_wiring

DEFAULT_TAU = 0.1


class DGStage(nn.Module):
    def __init__(
        self,
        blocks: Sequence[tuple[str, nn.Module]],
        channels: int,
        tau_init: float = DEFAULT_TAU,
        temperature: float = DEFAULT_TEMPERATURE,
        *,
        routing: str = "dynamic",
        wiring: StageWiring | None = None,
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
        self.wiring = wiring if wiring is not None else complete_wiring(n)
        if self.wiring.num_blocks != n:
            raise ValueError(f"a wiring for {self.wiring.num_blocks} blocks given to a stage of {n}")
        self.routing = routing
        self.routers = nn.ModuleList(make_router(routing, channels, len(t)) for t in self.wiring.successors)
        # Where each block's and the output node's inputs come from: (source block, router column).
        self._inputs = [self.wiring.predecessors(j + 1) for j in range(n + 1)]
        # A random graph is rebuilt from the manifest's seed on load; storing its edges
        # with the weights lets loading check that it was (``_load_from_state_dict``).
        # The complete wiring stays out of the state dict, so models stored before
        # wirings existed load unchanged.
        self.register_buffer("wiring_mask", self._edge_mask(), persistent=self.wiring.kind != "complete")
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
        """Routed edges the wiring has (complete DAG: each block to every later block and the output node)."""
        return len(self.wiring.edges)

    def _edge_mask(self) -> Tensor:
        """``mask[target, source]``: which routed edges the wiring has."""
        n = self.num_blocks
        mask = torch.zeros(n + 2, n + 2, dtype=torch.bool)
        for source, target in self.wiring.edges:
            mask[target, source] = True
        return mask

    def blocks(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.block_names]

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        outputs: list[Tensor | None] = []  # outputs[k] is block k+1's output (None where no image ran it)
        gated: list[Tensor] = []  # gated[k]: B × weights of block k+1's edges, in wiring.successors[k] order
        executed: list[Tensor] = []
        prune = not torch.is_grad_enabled()
        for k, (block, router) in enumerate(zip(self.blocks(), self.routers, strict=True)):
            if k == 0:
                inp, runs = x, torch.ones(batch, dtype=torch.bool, device=x.device)
            else:
                weights, sources = self._gather(k, gated, outputs)
                runs = torch.stack([w > 0 for w in weights], dim=1).any(dim=1)
                inp = _weighted_sum(weights, sources, prune)
            executed.append(runs)
            out, edges = self._run_node(block, router, self.tau[k], inp, runs)
            outputs.append(out)
            gated.append(edges)
        result = _weighted_sum(*self._gather(self.num_blocks, gated, outputs), prune)
        if result is None:  # every edge into the output node closed for every image
            first = outputs[0]
            assert first is not None  # block 1 always runs: its input edge is fixed open
            result = torch.zeros_like(first)
        self._record(gated, executed, batch, x.device)
        return result

    def _gather(
        self, node: int, gated: list[Tensor], outputs: list[Tensor | None]
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """The weights and source outputs of the edges into block ``node`` + 1 (``num_blocks``: the output node)."""
        edges = self._inputs[node]
        return [gated[k][:, col] for k, col in edges], [outputs[k] for k, _ in edges]

    def _run_node(
        self, block: nn.Module, router: Router | StaticRouter, tau: Tensor, inp: Tensor | None, runs: Tensor
    ) -> tuple[Tensor | None, Tensor]:
        batch = runs.shape[0]
        num_out = router.num_edges
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
        for k, (g, targets) in enumerate(zip(gated, self.wiring.successors, strict=True)):
            adj[:, list(targets), k + 1] = g.detach().float()
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
        return StageGraph(
            name=name,
            nodes=self.node_names,
            possible_edges=self.possible_edges,
            routing=self.routing,
            wiring=self.wiring.kind,
            edges=[[source, target] for source, target in self.wiring.edges],
        )

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
        # Block k is node k+1, so the chain edge goes to node k+2 (the output node for
        # the last block); a random wiring may lack it.
        if any(targets[0] != k + 2 for k, targets in enumerate(self.wiring.successors)):
            raise ValueError(f"the {self.wiring.kind} wiring lacks the chain edges block k → block k+1")
        for router in self.routers:
            edges = torch.zeros(router.num_edges, dtype=torch.bool)
            edges[0] = True  # the first routed edge of block k goes to block k+1 (or the output)
            router.pin(edges.to(self.tau.device))
        self.tau.fill_(0.5)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A random wiring is rebuilt from (kind, seed, block count) by networkx. Should
        # another networkx draw another graph for the same seed, the stored weights
        # belong to a different graph: refuse them rather than serve a graph they were
        # not trained for. load_state_dict raises on error_msgs whatever ``strict`` is.
        stored = state_dict.get(prefix + "wiring_mask")
        mask = self.wiring_mask
        if stored is not None and stored.shape == mask.shape and not torch.equal(stored.to(mask.device), mask):
            error_msgs.append(
                f"{prefix}wiring_mask: the stored {self.wiring.kind} graph differs from the one this "
                "wiring_seed builds here (another networkx version?)"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


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
