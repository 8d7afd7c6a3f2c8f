"""aflora: Adaptive Freezing of Low-Rank Adaptation (Liu, Kundu et al., 2024) as a command-line tool."""

__version__ = "0.1.0"
