"""The ``dgserve`` command: serve a model store, list architectures, import weights, train, inspect."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dgserve.cli_inspect import inspect_app

app = typer.Typer(help="dgserve: a model server that shows the path each image took.", no_args_is_help=True)
app.add_typer(inspect_app, name="inspect")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env DGSERVE_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env DGSERVE_PORT].")] = None,
    store: Annotated[Path | None, typer.Option(help="Model store directory [env DGSERVE_MODEL_STORE].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Inspection data directory [env DGSERVE_DATA_DIR].")] = None,
    grpc_port: Annotated[
        str | None, typer.Option(help="OIP gRPC port, or off [env DGSERVE_GRPC_PORT, default 8001].")
    ] = None,
) -> None:
    """Serve every model in the store (the bundled model_store/ by default)."""
    from dgserve.api.processes import run
    from dgserve.settings import Settings

    overrides = {"host": host, "port": port, "model_store": store, "data_dir": data_dir, "grpc_port": grpc_port}
    run(Settings(**{k: v for k, v in overrides.items() if v is not None}))


@app.command("models")
def list_architectures() -> None:
    """List the registered architectures."""
    from dgserve.models.registry import get_entry, list_models

    for name in list_models():
        entry = get_entry(name)
        typer.echo(f"{name:34s} {entry.task:15s} {entry.description}")


@app.command("import-torchvision")
def import_torchvision(
    arch: Annotated[str, typer.Argument(help="A dgnet_* architecture, e.g. dgnet_resnet50.")],
    weights: Annotated[Path, typer.Argument(help="A torchvision state dict (.pth), read with weights_only=True.")],
    name: Annotated[str, typer.Option(help="Model name in the store.")],
    labels: Annotated[Path, typer.Option(help="Text file, one class label per line.")],
    store: Annotated[Path, typer.Option(help="Model store directory.")] = Path("model_store"),
    input_size: Annotated[int, typer.Option(help="Square input size.")] = 224,
) -> None:
    """Import torchvision weights as a DG-Net whose routers follow the backbone's chain.

    The imported model computes what the torchvision model computes; fine-tune it with
    ``dgserve train`` so the routers learn per-image paths.
    """
    from dgserve.imaging import IMAGENET_MEAN, IMAGENET_STD
    from dgserve.model_store import ModelStore
    from dgserve.models.dgnet.convert import dgnet_from_state_dict, num_classes_of, read_torchvision_checkpoint

    state_dict = read_torchvision_checkpoint(weights)
    model = dgnet_from_state_dict(arch, state_dict)
    label_list = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
    stored = ModelStore(store).save(
        model,
        name=name,
        architecture=arch,
        arch_kwargs={"num_classes": num_classes_of(state_dict)},
        labels=label_list,
        preprocessing={
            "input_size": [input_size, input_size],
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "interpolation": "bilinear",
        },
        description=f"{arch} imported from {weights.name} with chain wiring (static equivalent of the torchvision model).",
    )
    typer.echo(f"wrote {stored.path}")


@app.command()
def train(
    architecture: Annotated[str | None, typer.Argument(help="Registered architecture (see `dgserve models`); optional with --from-store.")] = None,
    name: Annotated[str, typer.Option(help="Store name to write the trained model under (a new version).")] = ...,  # type: ignore[assignment]
    store: Annotated[Path, typer.Option(help="Model store directory.")] = Path("model_store"),
    data: Annotated[str, typer.Option(help="generated | imagefolder | coco | masks.")] = "generated",
    data_path: Annotated[Path | None, typer.Option(help="ImageFolder root, COCO annotation JSON, or a folder of images/ and masks/.")] = None,
    val_path: Annotated[Path | None, typer.Option(help="Held-out set in the same format (default: a seeded split).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Held out when no --val-path is given.")] = 0.1,
    train_size: Annotated[int, typer.Option(help="Generated data: training images.")] = 20000,
    val_size: Annotated[int, typer.Option(help="Generated data: held-out images.")] = 1000,
    data_seed: Annotated[int, typer.Option(help="Generated data: training draw.")] = 0,
    val_seed: Annotated[int, typer.Option(help="Generated data: held-out draw.")] = 1,
    input_size: Annotated[int | None, typer.Option(help="Square input size (default 64 classification, 128 detection).")] = None,
    max_objects: Annotated[int, typer.Option(help="Generated detection data: objects per scene, at most.")] = 5,
    augment: Annotated[bool, typer.Option(help="Random flips and 90-degree rotations.")] = True,
    arch_kwarg: Annotated[list[str] | None, typer.Option("--arch-kwarg", "-k", help="Builder keyword KEY=VALUE (VALUE as JSON), repeatable.")] = None,
    epochs: Annotated[int, typer.Option()] = 10,
    batch_size: Annotated[int, typer.Option()] = 64,
    optimizer: Annotated[str, typer.Option(help="adamw | sgd.")] = "adamw",
    lr: Annotated[float, typer.Option(help="Peak learning rate (linear warm-up, then --schedule).")] = 3e-3,
    weight_decay: Annotated[float, typer.Option(help="Decoupled (AdamW) or L2 (SGD) weight decay; none on biases, norms, routers and tau.")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option()] = 0.5,
    schedule: Annotated[str | None, typer.Option(help="cosine | poly after warm-up (default: the task's; poly for segmentation).")] = None,
    label_smoothing: Annotated[float, typer.Option()] = 0.0,
    sparsity: Annotated[float, typer.Option(help="Coefficient of the L1 penalty on gated edge weights.")] = 0.0,
    sparsity_warmup: Annotated[float, typer.Option(help="Epochs over which the sparsity coefficient ramps up from 0.")] = 0.0,
    dead_end_penalty: Annotated[float, typer.Option(help="Coefficient of the guard against DG-Net blocks that run but send nothing on.")] = 1.0,
    train_scope: Annotated[str, typer.Option("--train", help="all | routers (only routers and tau) | routers+head.")] = "all",
    from_store: Annotated[str | None, typer.Option(help="NAME[:VERSION] of a stored model to fine-tune.")] = None,
    init_backbone: Annotated[str | None, typer.Option(help="NAME[:VERSION] of a stored classifier to initialise a detector's backbone.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed and settings, same weights.")] = 0,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Write a checkpoint here after every epoch.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from --checkpoint-dir.")] = False,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
    description: Annotated[str, typer.Option(help="Manifest description.")] = "",
    dtype: Annotated[str, typer.Option(help="Storage dtype: float16 | float32.")] = "float16",
) -> None:
    """Train or fine-tune an architecture and write it into the store with a model card."""
    import json
    import shlex
    import sys

    from dgserve.training.config import TrainConfig
    from dgserve.training.run import train as run_training

    kwargs: dict[str, object] = {}
    for item in arch_kwarg or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--arch-kwarg")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    config = TrainConfig(
        name=name, architecture=architecture, store=store, arch_kwargs=kwargs,
        data=data, data_path=data_path, val_path=val_path, val_fraction=val_fraction,  # type: ignore[arg-type]
        train_size=train_size, val_size=val_size, data_seed=data_seed, val_seed=val_seed,
        input_size=input_size, max_objects=max_objects, augment=augment,
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,  # type: ignore[arg-type]
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, schedule=schedule, label_smoothing=label_smoothing,  # type: ignore[arg-type]
        sparsity=sparsity, sparsity_warmup=sparsity_warmup, dead_end_penalty=dead_end_penalty, train=train_scope, from_store=from_store, init_backbone=init_backbone,  # type: ignore[arg-type]
        seed=seed, checkpoint_dir=checkpoint_dir, resume=resume, workers=workers, threads=threads,
        progress=progress, description=description, storage_dtype=dtype,  # type: ignore[arg-type]
        command=shlex.join(["dgserve", "train", *sys.argv[sys.argv.index("train") + 1 :]]) if "train" in sys.argv else "",
    )  # fmt: skip
    try:
        config.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    stored, _ = run_training(config)
    typer.echo(f"wrote {stored.path}")


def main() -> None:
    app()
