"""``dgserve train``: train or fine-tune any registered architecture into the model store.

* ``config``: the run's settings (``TrainConfig``);
* the task (``dgserve.tasks``): data sources, collate, loss and evaluation of its kind of model;
* ``model``: fresh, ``--from-store`` fine-tuning, ``--init-backbone``, ``--train routers``;
* ``loop``: epochs, sparsity penalty, progress bars, per-epoch eval, checkpoints/resume;
* ``evaluate``: the edge-sparsity statistics every task's evaluation reports;
* ``checkpoint``: safetensors + JSON, never pickle;
* ``card``: the model card; ``run.train`` ties it all together.

Import ``dgserve.training.run.train`` and ``dgserve.training.config.TrainConfig``
directly: nothing is imported here, because the tasks use ``augment`` and
``evaluate`` and the run uses the tasks.
"""
