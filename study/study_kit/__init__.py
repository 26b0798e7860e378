"""What the studies share (installed with the package from a checkout, like ``recipe_kit``): `fmnist_common` (the
Fashion-MNIST model, data and measures of the large-batch studies), `runner` (running recipes as subprocesses and
reading their results) and `stats` (mean ± std and paired t-intervals)."""
