"""Sweeps over the trade-off parameters and the Pareto fronts of their runs.

  spec    sweep files (sweeps/*.yaml): read and fully validated before anything starts (`load_sweep`)
  tune    `cap sweep`: the Ray Tune driver and its trials; the sweep's MLflow parent run
  report  `cap pareto`: the fronts of an experiment's (or one sweep's) finished runs, as files and MLflow tags
  pareto  Pareto fronts and hypervolumes (pure functions)

MLflow is reached only through cap.tracking (`Store`).
"""

SWEEP_TAG = "cap.sweep"
"""tag of a sweep's parent run (value: the sweep's name); `cap pareto` leaves such runs out"""
SUPERSEDED_TAG = "cap.superseded"
"""tag ("true") of a trial attempt's run that a retry started over; `cap pareto` leaves such runs out"""
