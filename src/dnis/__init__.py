"""dnis: Differentiable Neural Input Search for recommender systems."""

__version__ = "0.1.0"
