"""What the studies share (installed with the package from a checkout, like ``recipe_kit``), so that a study file
holds its arms, its protocol and its command line:

* `sweep` -- log-grid sweeps that extend from an edge, the chosen value, the sweep's seed and holdout checks;
* `ledger` -- the ``runs.jsonl`` ledger: run keys, reading, durable appends, reuse only with the same settings;
* `schedule` -- the one large-batch LR rule and the one LR-milestone rule, steps per epoch, the step scheduler;
* `report` -- markdown tables and sections, ``mean ± std`` cells, paired comparisons, per-epoch curves;
* `cost` -- interleaved wall-time benchmarks (``cost.json``) and the time estimates of a plan;
* `stats` -- mean ± std and paired t-intervals;
* `runner` -- running ``recipes/*.py`` as study runs;
* `fmnist_common`, `training`, `chunk_sam`, `subspace_box` -- the Fashion-MNIST model, data and measures, the
  Trainer pieces of its studies, per-micro-batch SAM, and the random-subspace box comparison.
"""
