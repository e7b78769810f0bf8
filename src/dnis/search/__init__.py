"""Search methods. Each returns a `SearchResult`, so comparing them is a loop."""

from dnis.search.dnis import DnisConfig, dnis, materialize, retrain, search
from dnis.search.result import SearchResult
from dnis.search.uniform import uniform

__all__ = ["DnisConfig", "SearchResult", "dnis", "materialize", "retrain", "search", "uniform"]
