"""The Global Reasoning (GloRe) unit of Chen et al., CVPR 2019, section 3 / Figure 2.

Layer sizes and the forward pass follow the official PyTorch code as summarised in
``shared/papers/NOTES.md`` (read, not copied). In short, for an input ``x`` of C
channels and L locations:

    X_s = state_conv(x)                 (S x L)   1x1 conv C->S, bias
    B   = proj_conv(x)                  (N x L)   1x1 conv C->N, bias
    V   = X_s · Bᵀ  [· 1/L]             (S x N)   coordinate -> interaction space
    h   = node_conv(V) + V                        node-wise Conv1d N->N (A_g), bias
    Z   = channel_conv(ReLU(h))         (S x N)   channel-wise Conv1d S->S (W_g), no bias
    Y   = Z · B                         (S x L)   reverse projection, D = Bᵀ
    out = x + BN(extend_conv(Y))                  1x1 conv S->C, no bias; BN eps 1e-4

The paper writes the graph convolution as ((I − A_g)V)W_g; the official code uses the
``+ V`` identity form, and the sign is absorbed by the learned A_g.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from dgserve.connectivity import GloReUnitConnectivity, GloReUnitGraph
from dgserve.models.connectivity import adjacency_digest

Dims = Literal[1, 2, 3]

_CONV: dict[int, type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d]] = {
    1: nn.Conv1d,
    2: nn.Conv2d,
    3: nn.Conv3d,
}
_BATCH_NORM: dict[int, type[nn.BatchNorm1d] | type[nn.BatchNorm2d] | type[nn.BatchNorm3d]] = {
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
    3: nn.BatchNorm3d,
}


class GloReUnit(nn.Module):
    """A GloRe unit over 1-D (``dims=1``), 2-D or 3-D feature maps.

    ``num_nodes`` (N) defaults to C/4 and ``num_states`` (S) to C/2, as in the paper.
    Set ``normalize=True`` when the input size varies (detection, segmentation at
    several scales): V is then scaled by 1/L so its magnitude does not grow with the
    number of locations.

    A freshly built unit is exactly the identity, because its final BatchNorm starts
    with weight 0 and bias 0; this lets units be dropped into a pretrained backbone
    without changing its output.

    After every forward the unit keeps, per image, which graph node each location
    projects to most strongly (an int map the size of the feature map), for
    ``image_connectivity``. Set ``record_connectivity = False`` to skip that.
    """

    def __init__(
        self,
        in_channels: int,
        num_nodes: int | None = None,
        num_states: int | None = None,
        *,
        dims: Dims = 2,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if dims not in _CONV:
            raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
        nodes = in_channels // 4 if num_nodes is None else num_nodes
        states = in_channels // 2 if num_states is None else num_states
        if in_channels < 1 or nodes < 1 or states < 1:
            raise ValueError(
                f"GloRe unit needs positive sizes, got C={in_channels}, N={nodes}, S={states}"
            )
        conv = _CONV[dims]
        self.in_channels = in_channels
        self.num_nodes = nodes
        self.num_states = states
        self.dims: Dims = dims
        self.normalize = normalize
        self.record_connectivity = True

        self.state_conv = conv(in_channels, states, kernel_size=1)
        self.proj_conv = conv(in_channels, nodes, kernel_size=1)
        # Applied to V transposed to (N x S), so it mixes nodes: its weight is A_g.
        self.node_conv = nn.Conv1d(nodes, nodes, kernel_size=1)
        # Applied to V as (S x N), so it mixes state channels: its weight is W_g.
        self.channel_conv = nn.Conv1d(states, states, kernel_size=1, bias=False)
        self.extend_conv = conv(states, in_channels, kernel_size=1, bias=False)
        # Always a real, trainable BatchNorm, even inside a backbone built with
        # torchvision's FrozenBatchNorm2d (detection): a frozen BN would keep its weight
        # at the zero it starts with, so the unit would stay the identity forever and no
        # gradient would ever reach its convolutions; a frozen BN at its default weight 1
        # would instead make a new unit perturb the pretrained backbone from the start.
        self.bn = _BATCH_NORM[dims](in_channels, eps=1e-4)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

        self._projection: Tensor | None = None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return V (n, S, N), the node features, and B (n, N, L), the projection."""
        self._check_input(x)
        n = x.shape[0]
        states = self.state_conv(x).reshape(n, self.num_states, -1)
        projection = self.proj_conv(x).reshape(n, self.num_nodes, -1)
        v = torch.matmul(states, projection.transpose(1, 2))
        if self.normalize:
            v = v * (1.0 / states.shape[2])
        return v, projection

    def reason(self, v: Tensor) -> Tensor:
        """One graph-convolution layer over the fully connected node graph: V -> Z."""
        h = self.node_conv(v.transpose(1, 2)).transpose(1, 2) + v
        return self.channel_conv(torch.relu(h))

    def forward(self, x: Tensor) -> Tensor:
        v, projection = self.project(x)
        z = self.reason(v)
        y = torch.matmul(z, projection).reshape(x.shape[0], self.num_states, *x.shape[2:])
        out = x + self.bn(self.extend_conv(y))
        if self.record_connectivity:
            # The argmax map, not B itself: N times smaller and all inspection needs.
            nearest = projection.detach().argmax(dim=1).to(torch.int32)
            self._projection = nearest.reshape(x.shape[0], *x.shape[2:])
        return out

    @property
    def adjacency(self) -> Tensor:
        """A_g, (N x N): ``adjacency[i, j]`` weighs node j's features into node i.

        It is a weight, the same for every image, so it needs no forward pass.
        """
        return self.node_conv.weight.detach()[:, :, 0]

    @property
    def projection_maps(self) -> Tensor | None:
        """Per image of the last forward, the node each location projects to most
        strongly: int32 of shape (n, *feature map size); ``None`` before any forward."""
        return self._projection

    def image_connectivity(self, name: str) -> list[GloReUnitConnectivity]:
        """One record per image of the last forward (none before the first).

        The record's ``projection`` is two-dimensional: H x W for a 2-D unit, one row
        of L for a 1-D unit, and for a 3-D unit the T frames of H x W stacked top to
        bottom into a (T·H) x W map, with ``frames`` = T (1 otherwise).
        """
        if self._projection is None:
            return []
        matrix = self.adjacency.float().cpu().contiguous()
        adjacency: list[list[float]] = matrix.tolist()
        digest = adjacency_digest(matrix)
        width = self._projection.shape[-1]
        frames = self._projection.shape[1] if self.dims == 3 else 1
        maps = self._projection.cpu().reshape(self._projection.shape[0], -1, width)
        return [
            GloReUnitConnectivity(
                unit=name,
                num_nodes=self.num_nodes,
                # One list for the whole batch: A_g is a weight, the same for every image,
                # and records are read, never mutated (to_dict shares lists too), so a
                # per-image copy of an N x N matrix would be work for nothing.
                adjacency=adjacency,
                projection=image_map.tolist(),
                adjacency_digest=digest,
                frames=frames,
            )
            for image_map in maps
        ]

    def graph_description(self, name: str) -> GloReUnitGraph:
        return GloReUnitGraph(name=name, num_nodes=self.num_nodes, num_states=self.num_states,
                              in_channels=self.in_channels)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (n, {self.in_channels}) "
                f"followed by {self.dims} spatial dim(s), got {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_nodes={self.num_nodes}, "
            f"num_states={self.num_states}, dims={self.dims}, normalize={self.normalize}"
        )


class GloReUnit1d(GloReUnit):
    """GloRe unit over (n, C, L) inputs."""

    def __init__(
        self,
        in_channels: int,
        num_nodes: int | None = None,
        num_states: int | None = None,
        *,
        normalize: bool = False,
    ) -> None:
        super().__init__(in_channels, num_nodes, num_states, dims=1, normalize=normalize)


class GloReUnit2d(GloReUnit):
    """GloRe unit over (n, C, H, W) inputs."""

    def __init__(
        self,
        in_channels: int,
        num_nodes: int | None = None,
        num_states: int | None = None,
        *,
        normalize: bool = False,
    ) -> None:
        super().__init__(in_channels, num_nodes, num_states, dims=2, normalize=normalize)


class GloReUnit3d(GloReUnit):
    """GloRe unit over (n, C, T, H, W) inputs."""

    def __init__(
        self,
        in_channels: int,
        num_nodes: int | None = None,
        num_states: int | None = None,
        *,
        normalize: bool = False,
    ) -> None:
        super().__init__(in_channels, num_nodes, num_states, dims=3, normalize=normalize)
