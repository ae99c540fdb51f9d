"""The study driver and what only it uses: a spec's cells in rounds to an ended study run.

- :mod:`.driver`: :func:`~harness.study.driver.run_study`, the one flow from spec to study run, whatever executes
  the cells (:mod:`harness.engine`);
- :mod:`.rounds`: the design's rounds: which cells the next round needs, and each comparison's decisions;
- :mod:`.changes`: cells whose recorded run no longer matches them (refused, or superseded);
- :mod:`.parent_run`: the study's parent MLflow run.
"""
