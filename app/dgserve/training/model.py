"""Building the network a run trains: fresh, fine-tuned from the store, or with a stored backbone.

Also decides which parameters train (``--train``) and which get weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dgserve.models.dgnet.routing import PINNED_LOGIT, Router
from dgserve.models.dgnet.stage import DGStage
from dgserve.models.registry import ModelEntry, create_model, get_entry
from dgserve.model_store import ModelStore
from dgserve.model_store.manifest import Preprocessing
from dgserve.tasks import get_task
from dgserve.training.config import TrainConfig, parse_store_ref

# Logit magnitude a pinned router is relaxed to before its routing is trained: sigmoid(±3)
# is 0.95 / 0.05, still on the same side of the imported τ = 0.5, but with a gradient
# 1e11 times larger than at the pinned ±30, where training could not move it at all.
UNPINNED_LOGIT = 3.0

# A detector's backbone body holds a classifier's weights under this prefix
# (torchvision's BackboneWithFPN wraps the ResNet as ``body``).
BACKBONE_PREFIX = "backbone.body."


@dataclass
class BuiltModel:
    model: nn.Module
    architecture: str
    entry: ModelEntry
    arch_kwargs: dict[str, Any]
    preprocessing: Preprocessing
    notes: list[str] = field(default_factory=list)
    """How the weights were initialised, for the card."""


def resolve_architecture(config: TrainConfig) -> tuple[str, dict[str, Any], Preprocessing | None]:
    """The architecture, its stored kwargs and preprocessing when starting from the store."""
    if config.from_store is None:
        assert config.architecture is not None
        return config.architecture, {}, None
    name, version = parse_store_ref(config.from_store)
    manifest = ModelStore(config.store).resolve(name, version).manifest
    if config.architecture is not None and config.architecture != manifest.architecture:
        raise ValueError(
            f"--from-store {config.from_store} is a {manifest.architecture}, not {config.architecture}"
        )
    return manifest.architecture, dict(manifest.arch_kwargs), manifest.preprocessing


def resolve_preprocessing(config: TrainConfig) -> Preprocessing:
    """A stored model's own preprocessing when fine-tuning at its size, else the default."""
    architecture, _, stored_pre = resolve_architecture(config)
    if stored_pre is not None and config.input_size in (None, stored_pre.input_size[0]):
        return stored_pre
    task = get_task(get_entry(architecture).task)
    return task.default_preprocessing(config.input_size or task.default_input_size)


def build_model(config: TrainConfig, num_classes: int, pre: Preprocessing) -> BuiltModel:
    """``num_classes`` follows the manifest convention (detection counts background)."""
    architecture, stored_kwargs, _ = resolve_architecture(config)
    entry = get_entry(architecture)
    kwargs = {**stored_kwargs, **config.arch_kwargs, "num_classes": num_classes}
    torch.manual_seed(config.seed)  # the initial weights are part of what --seed fixes
    model = create_model(architecture, **kwargs)
    notes: list[str] = []
    if config.from_store is not None:
        name, version = parse_store_ref(config.from_store)
        loaded = ModelStore(config.store).load(name, version)
        skipped = load_matching(model, loaded.model.state_dict())
        notes.append(f"Initialised from store model `{loaded.name}` version {loaded.version}" + _skipped(skipped))
        relaxed = unpin_routers(model)
        if relaxed:
            notes.append(
                f"{relaxed} pinned routers (the chain wiring of an imported static model) relaxed to "
                f"±{UNPINNED_LOGIT:g} logits so that their routing can be trained."
            )
    if config.init_backbone is not None:
        if not any(key.startswith(BACKBONE_PREFIX) for key in model.state_dict()):
            raise ValueError(
                f"--init-backbone needs a model with a {BACKBONE_PREFIX}* backbone (a detector); "
                "use --from-store to fine-tune a classifier"
            )
        name, version = parse_store_ref(config.init_backbone)
        loaded = ModelStore(config.store).load(name, version)
        source = {BACKBONE_PREFIX + k: v for k, v in loaded.model.state_dict().items()}
        skipped = load_matching(model, source, only_prefix=BACKBONE_PREFIX)
        notes.append(f"Backbone initialised from store classifier `{loaded.name}` version {loaded.version}" + _skipped(skipped))
    if not notes:
        notes.append(f"Trained from scratch (random initialisation, seed {config.seed}).")
    set_trainable(model, config.train)
    return BuiltModel(model, architecture, entry, kwargs, pre, notes)


def load_matching(model: nn.Module, source: dict[str, torch.Tensor], only_prefix: str = "") -> list[str]:
    """Copy every tensor whose key and shape match; returns the model keys left as they were.

    A head whose class count changed (fine-tuning on other labels) keeps its fresh
    initialisation instead of failing the whole load.
    """
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError("no weights of the stored model fit this architecture")
    model.load_state_dict(matched, strict=False)
    return sorted(k for k in own if k.startswith(only_prefix) and k not in matched)


@torch.no_grad()
def unpin_routers(model: nn.Module) -> int:
    """Relax routers pinned by ``DGStage.pin_chain`` (zero weights, ±30 bias) to ±3; returns how many.

    A pinned router's sigmoid is saturated, so no gradient reaches it: fine-tuning the
    routers of a model brought in by ``dgserve import-torchvision`` would change nothing.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, Router) and not module.fc.weight.any():
            if bool((module.fc.bias.abs() >= PINNED_LOGIT - 1e-3).all()):
                module.fc.bias.copy_(module.fc.bias.sign() * UNPINNED_LOGIT)
                count += 1
    return count


def _skipped(keys: list[str]) -> str:
    if not keys:
        return "; every weight loaded."
    shown = ", ".join(f"`{k}`" for k in keys[:6])
    return f"; kept fresh (absent or of another shape there): {shown}{' ...' if len(keys) > 6 else ''}."


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, DGStage):
            params.append(module.tau)
            params.extend(module.routers.parameters())
    return params


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    # Classifiers end in ``fc``; torchvision detectors in ``roi_heads.box_predictor``.
    for name in ("fc", "roi_heads.box_predictor"):
        try:
            return list(model.get_submodule(name).parameters())
        except AttributeError:
            continue
    raise ValueError("no classification head (fc or roi_heads.box_predictor) found")


def set_trainable(model: nn.Module, scope: str) -> None:
    if scope == "all":
        return  # keep the builder's choice (a detector may freeze early backbone layers)
    keep = router_parameters(model)
    if not keep:
        raise ValueError(f"--train {scope} needs a DG-Net: this model has no routers")
    if scope == "routers+head":
        keep += head_parameters(model)
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """With the backbone frozen, its BatchNorm statistics must stay frozen too."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norms and τ (1-D tensors): decaying τ towards 0 would open
    # every edge, working against the sparsity penalty. None on routers either: it
    # pulls their weights to 0, i.e. towards the same gates for every image.
    routing = {id(p) for p in router_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or id(p) in routing else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
