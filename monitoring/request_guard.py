"""Which requests the dashboard answers: known host names only, and same-origin WebSockets.

Two ways another web site could read a session through the operator's browser, and
what stops each:

- **DNS rebinding**: a page at ``http://evil.example:8080/`` whose name the attacker
  then points at 127.0.0.1 is, to the browser, the same origin as its own: it may read
  every answer. Its requests carry ``Host: evil.example:8080``. So the dashboard
  answers only requests whose ``Host`` is one of its own names: ``localhost``, the
  address it is bound to, an IP address (a browser sends an IP literal only when the
  page itself came from that address, so it cannot be rebound), this machine's host
  name when bound beyond loopback, and the names given with ``--allow-host``
  (``*``: any). Others get **421** with a body that says which option lets the name in.
- **Cross-site WebSocket**: browsers let any page open a WebSocket to any address
  (the same-origin policy does not cover them) and say which page it is in the
  ``Origin`` header. An upgrade with an ``Origin`` that is not the dashboard's own
  (same scheme, host and port as the ``Host`` it was sent to) and not one given with
  ``--allow-origin`` (``*``: any) gets **403**. Clients that are not browsers send no
  ``Origin`` and are let in (they are not a page of another site).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["LOCAL_NAMES", "RequestGuard", "split_host"]

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")


def split_host(value: str) -> tuple[str, int | None]:
    """``name[:port]`` or ``[v6]:port`` -> (lower-case name without a trailing dot or brackets, port or None).

    Raises
    ------
    ValueError
        Not a host (empty, a bad port, unbalanced brackets, spaces or controls).
    """
    value = value.strip()
    if not value or any(c.isspace() or ord(c) < 32 or c in "/\\@?#" for c in value):
        raise ValueError(f"not a host: {value!r}")
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"not a host: {value!r}")
        port_text = rest[1:] if rest else None
    elif value.count(":") > 1:  # a bare IPv6 address
        name, port_text = value, None
    else:
        name, _, port_text = value.partition(":")
        port_text = port_text if ":" in value else None
    if port_text is not None and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"not a host: {value!r} (port)")
    name = name.lower().rstrip(".")
    if not name:
        raise ValueError(f"not a host: {value!r}")
    return name, None if port_text is None else int(port_text)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin(value: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` -> (scheme, name, port) with the scheme's default port; None if not one."""
    try:
        parts = urlsplit(value.strip())
        name, port = split_host(parts.netloc)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query or "@" in parts.netloc:
        return None
    return parts.scheme, name, port if port is not None else (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True)
class RequestGuard:
    """The dashboard's host names and the origins its WebSocket accepts.

    Parameters
    ----------
    bound: str
        The address the dashboard is bound to (``127.0.0.1``, ``0.0.0.0``, ...).
    allow_hosts: tuple[str, ...]
        More names it answers to (``--allow-host``); ``*``: any name.
    allow_origins: tuple[str, ...]
        More page origins whose WebSockets it accepts, e.g. ``https://scope.example``
        (``--allow-origin``); ``*``: any.

    Raises
    ------
    ValueError
        An allowed host or origin is malformed.
    """

    bound: str
    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    names: frozenset[str] = field(init=False)
    origins: frozenset[tuple[str, str, int]] = field(init=False)

    def __post_init__(self) -> None:
        names = set(LOCAL_NAMES)
        bound = self.bound.strip("[]").lower()
        if bound not in WILDCARDS:
            names.add(bound)
        if bound in WILDCARDS or not (_is_ip(bound) and ipaddress.ip_address(bound).is_loopback):
            names.add(socket.gethostname().lower().rstrip("."))  # served beyond loopback: its own name too
        for host in self.allow_hosts:
            if host != "*":
                try:
                    names.add(split_host(host)[0])
                except ValueError:
                    raise ValueError(f"--allow-host {host!r}: expected a host name such as scope-pc.example.org"
                                     ) from None
        origins = set()
        for origin in self.allow_origins:
            if origin != "*":
                parsed = _origin(origin)
                if parsed is None:
                    raise ValueError(f"--allow-origin {origin!r}: expected an origin such as https://scope.example")
                origins.add(parsed)
        object.__setattr__(self, "names", frozenset(names))
        object.__setattr__(self, "origins", frozenset(origins))

    def check_host(self, host_headers: list[str]) -> tuple[int, str] | None:
        """None if the request's ``Host`` header(s) name this dashboard, else (status, the reason to send)."""
        if len(host_headers) != 1:
            return 400, ("400 Bad Request: a request needs exactly one Host header "
                         f"(this one has {len(host_headers)}).\n")
        try:
            name, _ = split_host(host_headers[0])
        except ValueError:
            return 400, f"400 Bad Request: the Host header {host_headers[0]!r} is not a host name.\n"
        if name in self.names or _is_ip(name) or "*" in self.allow_hosts:
            return None
        return 421, (f"421 Misdirected Request: this dashboard does not answer to the name {name!r}.\n"
                     f"It answers to {', '.join(sorted(self.names))} and to IP addresses. Another web site could "
                     "point a name of its own at this machine and read the session through your browser (DNS "
                     "rebinding), so other names must be allowed: if this is the machine's name, serve the "
                     f"dashboard with `cryofastar-stream dashboard --allow-host {name}`.\n")

    def check_origin(self, origin: str | None, host_header: str) -> tuple[int, str] | None:
        """None if a WebSocket upgrade from the page at ``origin`` (None: not a browser) may connect."""
        if origin is None or "*" in self.allow_origins:
            return None
        parsed = _origin(origin)
        if parsed is not None:
            if parsed in self.origins:
                return None
            try:
                name, port = split_host(host_header)
            except ValueError:
                name, port = "", None
            if parsed == ("http", name, port if port is not None else 80):
                return None
        return 403, (f"403 Forbidden: a WebSocket from the page at {origin!r} may not read this dashboard (only "
                     "its own page may: another site open in the same browser must not see the session). If that "
                     "page is yours (e.g. a proxy), serve the dashboard with "
                     f"`cryofastar-stream dashboard --allow-origin {origin}`.\n")
