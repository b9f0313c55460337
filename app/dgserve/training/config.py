"""Everything one training run needs to know, in one typed record.

The CLI builds a ``TrainConfig`` from its flags; tests build one directly. The record
is also what a checkpoint stores (as JSON) so that ``--resume`` can refuse to continue
a run with different settings, and what the model card prints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DataSource = Literal["generated", "imagefolder", "coco", "masks"]
TrainScope = Literal["all", "routers", "routers+head"]
OptimizerName = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "poly"]

# Settings that may differ between a run and its resumption without changing the result.
# Where and how the result is stored does not change the training either.
_RESUMABLE = {
    "resume", "workers", "threads", "command", "checkpoint_dir", "progress",
    "name", "store", "storage_dtype", "description",
}  # fmt: skip


@dataclass
class TrainConfig:
    name: str
    """Store name the trained model is written under (a new version if it exists)."""
    architecture: str | None = None
    """Registered architecture; may be left out with ``from_store`` (the stored one is used)."""
    store: Path = Path("model_store")
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra builder keywords (width, tau_init, min_size, ...); num_classes comes from the data."""

    # --- data ---------------------------------------------------------------
    data: DataSource = "generated"
    data_path: Path | None = None
    """ImageFolder root, a COCO annotation JSON (images beside it), or a folder of
    ``images/`` and ``masks/`` (segmentation; see ``dgserve.data.sources``)."""
    val_path: Path | None = None
    """Held-out set in the same format; without it ``val_fraction`` of the training data is held out."""
    val_fraction: float = 0.1
    train_size: int = 20000
    """Generated data: number of training images/scenes."""
    val_size: int = 1000
    data_seed: int = 0
    val_seed: int = 1
    """Generated data: the held-out draw; must differ from ``data_seed``."""
    input_size: int | None = None
    max_objects: int = 5
    augment: bool = True
    """Random flips and 90-degree rotations (label-preserving for the shape classes)."""

    # --- optimisation ---------------------------------------------------------
    epochs: int = 10
    batch_size: int = 64
    optimizer: OptimizerName = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    schedule: Schedule | None = None
    """After warm-up: ``cosine`` decay, or ``poly`` ((1 - t)^0.9, as the GloRe paper trains
    segmentation); ``None`` is the task's own choice (``Task.schedule``)."""
    label_smoothing: float = 0.0
    sparsity: float = 0.0
    """λ of ``λ · edge_l1(model)``: pushes gated edge weights down so thresholds close edges."""
    dead_end_penalty: float = 1.0
    """Coefficient of the guard against blocks that run but send nothing on (regularizers.py)."""
    sparsity_warmup: float = 0.0
    """Epochs over which λ ramps linearly from 0: the task is learned before edges are pruned."""
    train: TrainScope = "all"
    """``routers``: freeze everything except DG-Net routers and τ; ``routers+head`` also trains the head."""
    from_store: str | None = None
    """``NAME[:VERSION]``: start from a stored model of the same architecture (fine-tuning)."""
    init_backbone: str | None = None
    """``NAME[:VERSION]``: a stored classifier whose weights initialise a detector's backbone."""
    seed: int = 0

    # --- run ------------------------------------------------------------------
    checkpoint_dir: Path | None = None
    resume: bool = False
    workers: int = 0
    threads: int | None = None
    progress: bool = True
    description: str = ""
    command: str = ""
    """The exact command line, for the model card."""
    storage_dtype: Literal["float16", "float32"] = "float16"

    def validate(self) -> None:
        for option, value, allowed in (
            ("--data", self.data, ("generated", "imagefolder", "coco", "masks")),
            ("--schedule", self.schedule or "cosine", ("cosine", "poly")),
            ("--optimizer", self.optimizer, ("adamw", "sgd")),
            ("--train", self.train, ("all", "routers", "routers+head")),
            ("--dtype", self.storage_dtype, ("float16", "float32")),
        ):
            if value not in allowed:
                raise ValueError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
        if self.architecture is None and self.from_store is None:
            raise ValueError("give an architecture or --from-store")
        if self.data != "generated" and self.data_path is None:
            raise ValueError(f"--data {self.data} needs --data-path")
        if self.data == "generated" and self.data_seed == self.val_seed:
            raise ValueError("--val-seed must differ from --data-seed, or the held-out set is the training set")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be positive")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1)")
        if min(self.sparsity, self.sparsity_warmup, self.dead_end_penalty) < 0:
            raise ValueError("--sparsity, --sparsity-warmup and --dead-end-penalty must be >= 0")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out, default=str))

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """Settings that differ from a checkpoint's, ignoring those that cannot change the result."""
        now = self.to_json()
        # A setting added after the checkpoint was written reads as its default, which
        # is what the older run effectively used.
        defaults = TrainConfig(name="").to_json()
        return sorted(k for k in now if k not in _RESUMABLE and now[k] != saved.get(k, defaults[k]))


def parse_store_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None); ``"name:3"`` -> (name, 3)."""
    name, sep, version = ref.partition(":")
    if not sep:
        return name, None
    if not version.isdigit():
        raise ValueError(f"{ref!r}: the version after ':' must be a number")
    return name, int(version)
