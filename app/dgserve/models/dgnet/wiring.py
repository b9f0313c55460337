"""Which routed edges a DG-Net stage has: the complete DAG, or a fixed random DAG (Table 4).

Nodes are numbered as the stage's adjacency matrix: 0 the input node, 1..N the
blocks, N+1 the output node. A wiring lists, for each block, the later nodes it sends
to. The complete wiring (the paper's DG-Net) sends every block to every later block
and to the output node. The random wirings are RandWire's baselines, which the paper
rebuilds with networkx: Erdős–Rényi (P=0.2), Barabási–Albert (M=5) and
Watts–Strogatz (K=4, P=0.75). Routers then weight only the edges the wiring has.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, get_args

import networkx as nx

WiringKind = Literal["complete", "er", "ba", "ws"]
WIRING_KINDS: tuple[str, ...] = get_args(WiringKind)

# RandWire's best settings, as DG-Net's Table 4 compares against them.
ER_P = 0.2
BA_M = 5
WS_K = 4
WS_P = 0.75


@dataclass(frozen=True)
class StageWiring:
    """``successors[k]``: the node indices block k+1 sends to, ascending, all later than k+1."""

    kind: str
    successors: tuple[tuple[int, ...], ...]

    @property
    def num_blocks(self) -> int:
        return len(self.successors)

    @property
    def edges(self) -> list[tuple[int, int]]:
        """Every routed edge as (source, target) node indices."""
        return [(k + 1, t) for k, targets in enumerate(self.successors) for t in targets]

    def predecessors(self, node: int) -> list[tuple[int, int]]:
        """The routed edges into ``node`` (a block or the output node), as (source block k, router column)."""
        return [(k, targets.index(node)) for k, targets in enumerate(self.successors) if node in targets]


def complete_wiring(num_blocks: int) -> StageWiring:
    n = num_blocks
    return StageWiring("complete", tuple(tuple(range(k + 2, n + 2)) for k in range(n)))


def stage_wiring(kind: str, num_blocks: int, seed: str) -> StageWiring:
    """The stage graph of ``kind``; a random one is a function of ``seed`` and ``num_blocks`` alone.

    ``seed`` is a string (the model's ``wiring_seed`` and the stage's name), so each
    stage of a model gets its own graph and the same seed always rebuilds the same
    graphs: ``random.Random`` hashes a string seed with SHA-512, not with Python's
    per-process ``hash``.
    """
    if kind == "complete":
        return complete_wiring(num_blocks)
    if kind not in WIRING_KINDS:
        raise ValueError(f"wiring must be one of {', '.join(WIRING_KINDS)}, got {kind!r}")
    undirected = _random_graph(kind, num_blocks, random.Random(seed))
    # Made acyclic by node order, as RandWire does: each undirected edge points from
    # the lower-numbered block to the higher one.
    succ: list[set[int]] = [set() for _ in range(num_blocks)]
    for u, v in undirected.edges():
        succ[min(u, v)].add(max(u, v))
    # RandWire joins every node without a predecessor to the graph's input node and
    # every node without a successor to its output node. Here the stage input feeds
    # block 1 alone (the first block changes resolution/channels, so no other block
    # can take the stage input), so block 1 plays the input node's part: a later
    # block with no predecessor gets an edge from block 1. Every block is then
    # reached from the stage input (by induction over the node order), and every block
    # without a successor sends to the output node, so every block reaches it.
    has_predecessor = {t for targets in succ for t in targets}
    for j in range(1, num_blocks):
        if j not in has_predecessor:
            succ[0].add(j)
    for targets in succ:
        if not targets:
            targets.add(num_blocks)  # block index N is the output node
    return StageWiring(kind, tuple(tuple(sorted(t + 1 for t in targets)) for targets in succ))


def _random_graph(kind: str, n: int, rng: random.Random) -> nx.Graph:
    # RandWire draws 32 nodes per stage; torchvision's stages have 1 to 36 blocks. BA
    # needs M < n and WS needs K <= n, so on a small stage they are capped at what the
    # stage can hold (WS with K = n is networkx's complete graph).
    if kind == "er":
        return nx.erdos_renyi_graph(n, ER_P, seed=rng)
    if kind == "ba":
        return nx.barabasi_albert_graph(n, min(BA_M, n - 1), seed=rng) if n > 1 else nx.empty_graph(n)
    return nx.watts_strogatz_graph(n, min(WS_K, n), WS_P, seed=rng)
