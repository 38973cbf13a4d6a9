"""Reports: the comparison of finished runs, its figures and its documents."""
