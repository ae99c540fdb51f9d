"""How a study's cells are placed and guarded: in this process (:mod:`.lock`, :mod:`.order`) or on Ray.

:mod:`.attempt` stops a superseded writer, :mod:`.ray_study` and :mod:`.ray_tune` are the Ray drivers
(imported only under ``--ray``). What makes a cell run exactly once stays in the harness: one MLflow
run per cell found by its cell tag, atomic checkpoints, no step logged twice on resume.
"""
