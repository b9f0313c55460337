"""``dgserve train``: train or fine-tune any registered architecture into the model store.

* ``config``: the run's settings (``TrainConfig``);
* ``data``: generated scenes, ImageFolder and COCO sources, through the server's preprocessing;
* ``model``: fresh, ``--from-store`` fine-tuning, ``--init-backbone``, ``--train routers``;
* ``loop``: epochs, sparsity penalty, progress bars, per-epoch eval, checkpoints/resume;
* ``evaluate``: top-1, COCOeval mAP, edge-sparsity statistics;
* ``checkpoint``: safetensors + JSON, never pickle;
* ``card``: the model card; ``run.train`` ties it all together.
"""

from dgserve.training.config import TrainConfig
from dgserve.training.run import train

__all__ = ["TrainConfig", "train"]
