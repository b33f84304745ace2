"""vlplan.planner: the analytic estimator. Pure Python: importing it never imports torch."""
