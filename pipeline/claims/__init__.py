"""Claims: textbook rules of thumb run as experiments, each with a verdict computed by a rule stated in code."""
