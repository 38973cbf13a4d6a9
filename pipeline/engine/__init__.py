"""The engine: training, evaluation, tasks, diagnostics, cost, quality and tracking of one run."""
