"""The application layer: what a run is, on top of the library.

`config` (the YAML file of a run), the commands `train`, `search`, `compare`, `evaluate` and
`demo`, experiment tracking (`track`) and reports (`report`). It imports every layer below it
(data, embeddings, models, tasks, train, search, export); none of them imports it, and only
`dnis.cli` sits above it (`tests/test_layers.py` checks both).
"""
