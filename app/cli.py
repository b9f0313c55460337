"""The ``dgserve`` command: serve a model store, list architectures, import weights, train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="dgserve: a model server that shows the path each image took.", no_args_is_help=True)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env DGSERVE_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env DGSERVE_PORT].")] = None,
    store: Annotated[Path | None, typer.Option(help="Model store directory [env DGSERVE_MODEL_STORE].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Inspection data directory [env DGSERVE_DATA_DIR].")] = None,
) -> None:
    """Serve every model in the store (the bundled model_store/ by default)."""
    from dgserve.api.server import run
    from dgserve.settings import Settings

    overrides = {"host": host, "port": port, "model_store": store, "data_dir": data_dir}
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
    from dgserve.models.dgnet.convert import dgnet_from_state_dict, num_classes_of, read_torchvision_checkpoint
    from dgserve.store import ModelStore

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
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "interpolation": "bilinear",
        },
        description=f"{arch} imported from {weights.name} with chain wiring (static equivalent of the torchvision model).",
    )
    typer.echo(f"wrote {stored.path}")


def main() -> None:
    app()
