"""Is a server there? One short TCP connection, so an unreachable host is an error at once rather than after retries."""

from __future__ import annotations

import socket
import urllib.parse

from kscope.errors import KscopeError


def reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    """Does ``host:port`` accept a TCP connection within ``timeout`` seconds?"""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_url(url: str, flag: str) -> None:
    """Refuse, before any work, ``url`` unless it is ``http(s)://host[:port]/...`` and something answers there."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise KscopeError(f"{flag} {url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    if not reachable(parts.hostname, port):
        raise KscopeError(f"{flag} {url}: nothing answers at {parts.hostname}:{port}")
