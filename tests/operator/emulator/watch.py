"""What a watch sees: the changes the store records, the queue a live watch reads them from, and
how a change looks through a watch's selectors."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change, as kept in the history that watches replay."""

    resource_version: int
    key: tuple[str, str]  # the storage key of the resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict  # the object after the change (its last state for DELETED)
    old: dict | None  # the object before the change, to move it in or out of a selector


@dataclasses.dataclass(eq=False)
class Watcher:
    """A live watch: the store pushes its events into the queue from whichever thread writes."""

    key: tuple[str, str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def push(self, event: WatchEvent | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass


def _shown(event: WatchEvent, matches: Callable[[dict | None], bool]) -> tuple[str, dict] | None:
    """How a change looks through a watch's filter: MODIFIED into view is ADDED, out of view is
    DELETED, outside it nothing."""
    if event.type == "MODIFIED":
        was, now = matches(event.old), matches(event.obj)
        if was and now:
            return "MODIFIED", event.obj
        if now:
            return "ADDED", event.obj
        if was:
            return "DELETED", event.obj
        return None
    return (event.type, event.obj) if matches(event.obj) else None
