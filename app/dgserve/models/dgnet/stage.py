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
edges are closed for that image. (That is the ``skip`` execution; ``masked`` computes
every block on the whole batch and closes the same edges, see ``ExecutionKind``.)

After each forward the stage keeps, detached, the B×(N+2)×(N+2) matrix of gated edge
weights (``adjacency[b, target, source]``, the paper's buffer) and which nodes ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgserve.connectivity import StageConnectivity, StageGraph
from dgserve.models.dgnet.execution import ExecutionKind, check_execution
from dgserve.models.dgnet.routing import DEFAULT_TEMPERATURE, make_router, threshold_edges
from dgserve.models.dgnet.sums import accumulate, masked_sum
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
        execution: ExecutionKind = "auto",
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
        self.execution = check_execution(execution)
        self._edge_counts = [len(t) for t in self.wiring.successors]
        # Per routed edge, in the order of the stage's concatenated gates: its source
        # block (to gate static edges with their τ at once) and its flat index in the
        # (N+2)×(N+2) record (to write the record in one scatter).
        size = n + 2
        self.register_buffer(
            "_edge_source",
            torch.tensor([k for k, t in enumerate(self.wiring.successors) for _ in t], dtype=torch.long),
            persistent=False,
        )
        self.register_buffer(
            "_record_index",
            torch.tensor([t * size + s for s, t in self.wiring.edges], dtype=torch.long),
            persistent=False,
        )
        template = torch.zeros(size * size)
        template[size] = 1.0  # input → block 1: fixed open
        self.register_buffer("_record_template", template, persistent=False)
        self.register_buffer("_input_node", torch.arange(size) == 0, persistent=False)
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
        # Under torch.compile skip's host reads would break the graph at every block and
        # recompile per routing pattern, so a compiled forward runs masked in every mode.
        auto_masked = self.execution == "auto" and x.device.type == "cuda"
        masked = self.execution == "masked" or auto_masked or torch.compiler.is_compiling()
        result, gated = self._forward_masked(x) if masked else self._forward_skip(x)
        self._record(gated, x.shape[0], x.device)
        return result

    # --- routing ------------------------------------------------------------------

    def _gate(self, k: int, out: Tensor) -> Tensor:
        """Block k+1's gated output edges for the images in ``out`` (dynamic; static while training).

        The same arithmetic as ``Router.forward`` followed by ``threshold_edges``,
        without two module calls per node. Routers cannot share one matmul: router k
        reads block k's output, and block k+1's input needs router k's gates first.
        """
        router = self.routers[k]
        if torch.is_grad_enabled():
            # Training goes through the module, so forward hooks on routers (the dead-end
            # guard in training/regularizers.py) still see α.
            return threshold_edges(router(out), self.tau[k], self.temperature)
        fc = router.fc
        pooled = out.mean(dim=tuple(range(2, out.dim())))
        alpha = torch.sigmoid(F.linear(pooled, fc.weight, fc.bias))
        return threshold_edges(alpha, self.tau[k], self.temperature)

    def static_gates(self) -> list[Tensor]:
        """Every block's gated output edges under static routing, in one sigmoid and one threshold.

        Static α does not depend on the image, so the whole stage is gated at once: one
        vector of edges, each compared with its source block's τ. Used without autograd;
        training calls each router (its hooks must fire).
        """
        logits = torch.cat([router.logit for router in self.routers])
        gates = threshold_edges(torch.sigmoid(logits), self.tau[self._edge_source], self.temperature)
        return list(gates.split(self._edge_counts))

    # --- skip mode: each block runs on the images that reach it -------------------

    def _forward_skip(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        batch = x.shape[0]
        prune = not torch.is_grad_enabled()
        static = self.static_gates() if self.routing == "static" and not torch.is_grad_enabled() else None
        # A host copy of which edges are open, read once per block (static: once per
        # stage): every later decision (who runs, which sources to add) reads it, not
        # the device tensors, so a stage syncs at most once per block.
        static_open = [g.gt(0).tolist() for g in static] if static is not None else None
        outputs: list[Tensor | None] = []  # outputs[k] is block k+1's output (None where no image ran it)
        gated: list[Tensor] = []  # gated[k]: B × weights of block k+1's edges, in wiring.successors[k] order
        opened: list[list[list[bool]]] = []  # opened[k][b][col]: host copy of gated[k] > 0
        for k, block in enumerate(self.blocks()):
            num_out = self._edge_counts[k]
            if k == 0:
                inp: Tensor | None = x
                runs = [True] * batch
            else:
                runs = [any(opened[s][b][c] for s, c in self._inputs[k]) for b in range(batch)]
                inp = self._weighted_sum(k, gated, outputs, opened, prune)
            n_run = sum(runs)
            if inp is None or n_run == 0:
                outputs.append(None)
                gated.append(x.new_zeros((batch, num_out), dtype=self.tau.dtype))
                opened.append([[False] * num_out for _ in range(batch)])
                continue
            if n_run == batch:
                out = block(inp)
                edges = static[k].expand(batch, -1) if static is not None else self._gate(k, out)
            else:
                # Run the block on the images that reach it, and only on those.
                idx = torch.tensor([b for b, r in enumerate(runs) if r], device=x.device)
                sub_out = block(inp[idx])  # unlike index_select, indexing keeps a channels_last layout
                sub_edges = static[k].expand(n_run, -1) if static is not None else self._gate(k, sub_out)
                out = _zeros_for_batch(sub_out, batch).index_copy_(0, idx, sub_out)
                edges = sub_edges.new_zeros((batch, num_out)).index_copy(0, idx, sub_edges)
            outputs.append(out)
            gated.append(edges)
            if static_open is not None:
                opened.append([static_open[k] if r else [False] * num_out for r in runs])
            else:
                opened.append(edges.gt(0).tolist())
        result = self._weighted_sum(self.num_blocks, gated, outputs, opened, prune)
        if result is None:  # every edge into the output node closed for every image
            first = outputs[0]
            assert first is not None  # block 1 always runs: its input edge is fixed open
            result = torch.zeros_like(first)
        return result, gated

    def _weighted_sum(
        self,
        node: int,
        gated: list[Tensor],
        outputs: list[Tensor | None],
        opened: list[list[list[bool]]],
        prune: bool,
    ) -> Tensor | None:
        """Σ_i w_i · x_i over the computed sources of block ``node`` + 1 (``num_blocks``: the output node).

        With ``prune`` (no gradient needed) a source whose edge is closed for every image
        of the batch is left out: it would add exactly zero.
        """
        total: Tensor | None = None
        for s, col in self._inputs[node]:
            out = outputs[s]
            if out is None or (prune and not any(row[col] for row in opened[s])):
                continue
            total = accumulate(total, gated[s][:, col], out)
        return total

    # --- masked mode: every block on the whole batch, closed edges multiply by 0 ---

    def _forward_masked(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The skip mode's outputs and records without data-dependent control flow.

        Each block runs on every image; an image for which the block would be skipped
        gets its output edges zeroed, so that block's output reaches nothing. No value
        is read back to the host, which on a GPU costs more than the skipped blocks save.
        """
        batch = x.shape[0]
        static = self.static_gates() if self.routing == "static" and not torch.is_grad_enabled() else None
        outputs: list[Tensor] = []
        gated: list[Tensor] = []
        for k, block in enumerate(self.blocks()):
            runs: Tensor | None = None
            if k == 0:
                out = block(x)
            else:
                sources = self._inputs[k]
                total = masked_sum(sources, gated, outputs)
                if total is None:  # a random wiring may leave a block without inputs
                    total = torch.zeros_like(outputs[0])
                    runs = torch.zeros(batch, dtype=torch.bool, device=x.device)
                else:
                    runs = torch.stack([gated[s][:, c] for s, c in sources], dim=1).gt(0).any(dim=1)
                out = block(total)
            edges = static[k].expand(batch, -1) if static is not None else self._gate(k, out)
            if runs is not None:
                edges = torch.where(runs.unsqueeze(1), edges, edges.new_zeros(()))
            outputs.append(out)
            gated.append(edges)
        result = masked_sum(self._inputs[self.num_blocks], gated, outputs)
        return (result if result is not None else torch.zeros_like(outputs[0])), gated

    # --- records ----------------------------------------------------------------

    def _record(self, gated: list[Tensor], batch: int, device: torch.device) -> None:
        size = self.num_blocks + 2
        # The fixed input → block 1 edge comes from the template; every routed edge of
        # the stage goes in with one scatter (their flat target·size+source indices).
        adj = self._record_template.float().repeat(batch, 1)
        adj.index_copy_(1, self._record_index, torch.cat(gated, dim=1).detach().float())
        adj = adj.view(batch, size, size)
        # A node ran iff one of its input edges is open (a block that did not run has
        # its own output edges closed), so the flags follow from the matrix; the input
        # node always "runs".
        ran = adj.gt(0).any(dim=2) | self._input_node
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


def _zeros_for_batch(rows: Tensor, batch: int) -> Tensor:
    """Zeros for ``batch`` rows shaped as ``rows``'s, in its memory layout.

    ``new_zeros`` would give NCHW whatever ``rows`` is; under channels_last weights
    (DGSERVE_MEMORY_FORMAT) that one map would make every weighted sum it joins mix layouts.
    """
    channels_last = rows.dim() == 4 and rows.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((batch, *rows.shape[1:]), dtype=rows.dtype, device=rows.device, memory_format=layout).zero_()


def set_execution(model: nn.Module, execution: ExecutionKind) -> None:
    """Choose how every DG-Net stage of ``model`` runs skipped blocks (see ``ExecutionKind``)."""
    check_execution(execution)
    for m in model.modules():
        if isinstance(m, DGStage):
            m.execution = execution

