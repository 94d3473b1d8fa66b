"""tally: GPU sharing with performance isolation for deep-learning jobs."""

__version__ = "0.1.0"
