"""The names of the curves every trial logs (and the report reads back), defined once.

MLflow charts a run's metrics in name order, so the headline curves carry a prefix that sorts
first. Validation has two measures: the mid-run estimate on the first ``budget.eval_tokens`` tokens
(``val_subset_*``) and the full split (``val_*``, at the last step and whenever ``eval_tokens`` is
unset); they never share a curve.
"""

HEADLINE = "0_"  # sorts before any letter, so these charts come first
TRAIN_LOSS = f"{HEADLINE}train_loss"
VAL_PPL = f"{HEADLINE}val_ppl"  # the full validation split
VAL_SUBSET_PPL = f"{HEADLINE}val_subset_ppl"  # the mid-run estimate on budget.eval_tokens
VAL_LOSS, VAL_SUBSET_LOSS = "val_loss", "val_subset_loss"
BACKBONE_SPREAD = "backbone_spread"  # models.base.token_spread at each logging step: ~0 means a saturated backbone
