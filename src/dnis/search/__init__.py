"""Search methods. Each returns a `SearchResult`, so comparing them is a loop.

Importing the package registers every built-in method (`dnis.search.methods.method(name)` looks
them up): each method module registers itself with `register_method`, and this file imports them
all, so the registry never imports a method module and no import goes round in a circle.
"""

from dnis.search import (  # noqa: F401  (imported to register the built-in methods)
    autodim,
    dsl,
    hashing,
    magprune,
    mde,
    methods,
    nested,
    optfs,
    outrank,
    pep,
    precision,
    ptq,
    qr,
    random_search,
    unified,
)
from dnis.search.dnis import DnisConfig, dnis, materialize, retrain, search
from dnis.search.result import SearchResult
from dnis.search.uniform import uniform

__all__ = ["DnisConfig", "SearchResult", "dnis", "materialize", "retrain", "search", "uniform"]
