"""The model card (card.md) written next to every trained version.

It records what a reader needs to trust or reproduce the model: the data, the exact
command, the epochs, the measured held-out metrics and the edge-sparsity figures.
Every number in it comes from the run's own evaluation; nothing is typed in by hand.
"""

from __future__ import annotations

from typing import Any

from dgserve.tasks import Task
from dgserve.training.config import TrainConfig
from dgserve.training.loop import History


def render_card(
    *,
    config: TrainConfig,
    task: Task,
    name: str,
    architecture: str,
    arch_kwargs: dict[str, Any],
    labels: list[str],
    data_description: str,
    init_notes: list[str],
    history: History,
    num_params: int,
    input_size: int,
) -> str:
    final = history.epochs[-1]
    lines = [
        f"# {name}",
        "",
        f"`{architecture}` ({', '.join(f'{k}={v}' for k, v in sorted(arch_kwargs.items()))}), "
        f"{num_params / 1e6:.2f} M parameters, stored as {config.storage_dtype}, input {input_size}x{input_size}.",
        "",
        f"Labels: {', '.join(labels)}.",
        "",
        "## Data",
        "",
        data_description,
        "",
        "## Command",
        "",
        "```",
        config.command or "(called from Python, not the command line)",
        "```",
        "",
        "## Training",
        "",
        *[f"- {note}" for note in init_notes],
        f"- {len(history.epochs)} epochs, batch {config.batch_size}, {config.optimizer} at peak lr {config.lr:g} "
        f"(warm-up {_epochs(config.warmup_epochs)}, {config.schedule or task.schedule} decay), weight decay {config.weight_decay:g}, "
        f"seed {config.seed}, trained parameters: {config.train}.",
        _sparsity_line(config, routed="connectivity" in final),
        f"- Augmentation: {task.augmentation if config.augment else 'none'}.",
        *(
            [f"- Resumed (`--resume`) from the checkpoint written after epoch {history.resumed_at}, same settings."]
            if history.resumed_at is not None
            else []
        ),
        f"- {history.images} images seen in {history.seconds / 60:.1f} min of training "
        f"({history.images / max(history.seconds, 1e-9):.0f} images/s, CPU).",
        "",
        "## Held-out metrics per epoch",
        "",
        *_epoch_table(task, history.epochs),
        "",
        "## Final held-out metrics",
        "",
        *task.card_results(final, labels),
    ]
    if "connectivity" in final:
        lines += ["", "## Edge sparsity (inference path, held-out set)", "", *_connectivity(task, final, labels)]
    return "\n".join(lines) + "\n"


def _sparsity_line(config: TrainConfig, routed: bool) -> str:
    if not routed:
        return "- No sparsity penalty: the architecture has no routed edges."
    ramp = f", ramped in over {_epochs(config.sparsity_warmup)}" if config.sparsity_warmup else ""
    return (
        f"- Sparsity penalty λ = {config.sparsity:g} on the mean gated edge weight (`edge_l1`){ramp}; "
        f"dead-end guard coefficient {config.dead_end_penalty:g} (`dgserve.training.regularizers`)."
    )


def _epoch_table(task: Task, epochs: list[dict[str, Any]]) -> list[str]:
    metric, title = task.metric
    routed = "connectivity" in epochs[0]
    head = f"| epoch | train loss | held-out {title} |" + (" closed edges | distinct patterns |" if routed else "")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in epochs:
        row = f"| {e['epoch']} | {e['train_loss']:.4f} | {e[metric]:.4f} |"
        if routed:
            c = e["connectivity"]
            row += f" {c['closed_edge_fraction']:.1%} | {c['distinct_patterns']} |"
        rows.append(row)
    return rows


def _connectivity(task: Task, final: dict[str, Any], labels: list[str]) -> list[str]:
    conn = final["connectivity"]
    lines = [
        f"- Closed edges per image, on average: **{conn['closed_edge_fraction']:.1%}** of the routed edges.",
        f"- Distinct active-edge patterns: **{conn['distinct_patterns']}** over {conn['images']} images.",
        "- Mean open edges per stage: "
        + ", ".join(f"{stage} {mean:.2f}/{possible}" for stage, (mean, possible) in conn["per_stage_mean_open_edges"].items())
        + ".",
    ]
    if "class_adjacency_max_difference" in conn:
        lines.append(
            f"- Per-class mean adjacencies (grouped by the {task.routing_groups}) differ: largest mean |difference| between two classes "
            f"**{conn['class_adjacency_max_difference']:.4f}**."
        )
        lines.append(
            "- Mean gated edge weight per class: "
            + ", ".join(f"{task.class_name(labels, c)} {w:.3f}" for c, w in conn["class_mean_edge_weight"].items())
            + "."
        )
    return lines


def _epochs(n: float) -> str:
    return f"{n:g} epoch" + ("" if n == 1 else "s")
