"""Progress reporting through a callback: the library never prints, the CLI renders."""

from __future__ import annotations

from typing import Any


class Progress:
    """Callback interface; the default does nothing (tests and library use stay silent)."""

    def epoch_start(self, epoch: int, batches: int) -> None: ...

    def batch_end(self) -> None: ...

    def epoch_end(self, record: dict[str, Any]) -> None: ...

    def note(self, message: str) -> None:
        """Something the user should read, e.g. that training stopped at its epoch cap."""


SilentProgress = Progress
