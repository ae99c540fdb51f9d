"""``harness tune``: an Optuna search over a spec's ``tune`` section, every trial an MLflow run.

Modules: :mod:`~harness.tune.command` (the CLI face; imports nothing heavy until it runs),
:mod:`~harness.tune.search` (the study loop shared by all workers), :mod:`~harness.tune.storage`
(the Optuna database), :mod:`~harness.tune.budget` (``n_trials`` across workers),
:mod:`~harness.tune.objective` (one trial), :mod:`~harness.tune.results` (best trials, exported
spec), :mod:`~harness.tune.attrs` (what is stored on Optuna trials). See docs/tuning.md.
"""
