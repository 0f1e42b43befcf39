"""Hyperparameter search: a recipe's ``tune:`` space searched by Ray Tune, one Ray Train run per trial."""
