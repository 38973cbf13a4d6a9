"""archlab's pipeline: specs, data, training, evaluation, tracking, sweeps and reports."""
