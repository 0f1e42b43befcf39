"""Hyperparameter search: a recipe's ``tune:`` space searched by Ray Tune, one Ray Train run per trial.

The package is ``search``, not ``tune``: a subpackage ``raytune_ft.tune`` would replace the public
function ``raytune_ft.tune`` with itself as soon as anything imported it."""
