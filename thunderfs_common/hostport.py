"""HOST:PORT options (``--listen``, ``--peer-listen``, ``--metrics-listen``), parsed one way."""

from __future__ import annotations


def parse_host_port(text: str | None, flag: str) -> tuple[str, int]:
    """``"10.0.0.5:7071"``, ``"[::1]:7071"``, ``":7071"`` (every address) -> (host, port).  Port 0
    is refused: a service others must reach (and that is announced to them) needs a known port.
    ``ValueError`` saying what ``flag`` expects."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} must be HOST:PORT with a port from 1 to 65535, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
