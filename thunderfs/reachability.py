"""Whether a dependency (Glance, the tracker) answers: logged when it goes away and when it comes
back, once each, not on every failed call."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Reachability:
    def __init__(self, what: str):
        self.what = what
        self.ok: bool | None = None

    def up(self) -> None:
        if self.ok is False:
            log.warning("%s is reachable again", self.what)
        self.ok = True

    def down(self, why: str, meanwhile: str) -> None:
        if self.ok is not False:
            log.warning("%s unavailable (%s); %s", self.what, why, meanwhile)
        self.ok = False
