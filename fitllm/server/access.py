"""Which browsers may talk to the server: the Host allow-list (against DNS rebinding) and the Origin
allow-list (CORS), both checked by the request guard before a request runs.

- Host: a page on a name its owner's DNS later points at 127.0.0.1 (DNS rebinding) reaches the server with
  that name in `Host`. Allowed by default: `localhost` and `*.localhost` (RFC 6761: always loopback), any IP
  address (a rebinding attack needs a name), the name the server is bound to, and `--allowed-hosts` (a
  leading dot allows every subdomain; `*` turns the check off). Ports are ignored: `localhost` and
  `localhost:7860` are the same host. As Ollama and Jupyter do.
- Origin: a request a browser sends from another page carries its `Origin`. Allowed by default: the
  server's own pages (same origin: the studio); `--allowed-origins` adds others (`null` for pages opened
  from a file, as KoboldAI Lite's, `http://localhost:5001`, ...) or `*` for any. A request from any other
  origin is refused before it runs, whatever its method or content type: a "simple" cross-origin POST
  (`text/plain`, which the Kobold routes read as JSON) skips the CORS preflight, so hiding its response
  would not be enough.

Clients that are not browsers (curl, SDKs, SillyTavern's server-side proxy) send no Origin and pass.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

ANY = "*"


def host_name(host: str) -> str:
    """The name of a `Host` header or --allowed-hosts entry, lower-cased, without port or trailing dot."""
    h = host.strip().lower()
    if h.startswith("["):  # [::1]:7860
        end = h.find("]")
        return h[1:end] if end > 0 else h
    name, sep, port = h.rpartition(":")
    if sep and ":" not in name and (port.isdigit() or not port):
        h = name
    return h.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.partition("%")[0])  # fe80::1%eth0: a zone id is not part of the address
    except ValueError:
        return False
    return True


def split_list(values: Iterable[str] | None) -> list[str]:
    """Flag values that may each hold several comma-separated entries."""
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The allowed Host names and Origins (see the module docstring); `AccessPolicy()` is the default."""

    hosts: frozenset[str] = frozenset()
    origins: frozenset[str] = frozenset()
    any_host: bool = False
    any_origin: bool = False

    @classmethod
    def build(
        cls,
        allowed_hosts: Iterable[str] | None = None,
        allowed_origins: Iterable[str] | None = None,
        bound_host: str | None = None,
    ) -> AccessPolicy:
        hosts = split_list(allowed_hosts) + ([bound_host] if bound_host else [])
        origins = split_list(allowed_origins)
        return cls(
            hosts=frozenset(h if h.startswith(".") else host_name(h) for h in hosts if h != ANY),
            origins=frozenset(o.lower().rstrip("/") for o in origins if o != ANY),
            any_host=ANY in hosts,
            any_origin=ANY in origins,
        )

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request with this `Host` header may be served (no header: not a browser; allowed)."""
        if self.any_host or not host:
            return True
        name = host_name(host)
        if name == "localhost" or name.endswith(".localhost") or _is_ip(name) or name in self.hosts:
            return True
        return any(h.startswith(".") and (name.endswith(h) or name == h[1:]) for h in self.hosts)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Whether a browser page at `origin` may call the server reached as `host`."""
        origin = origin.strip().lower().rstrip("/")
        if self.any_origin or origin in self.origins:
            return True
        # Same origin: the server's own pages (the studio). The Host check has vetted the name already.
        return origin != "null" and bool(host) and urlsplit(origin).netloc == host.strip().lower()

    def cors_origins(self) -> list[str]:
        """allow_origins for the CORS middleware (same-origin requests need no CORS headers)."""
        return [ANY] if self.any_origin else sorted(self.origins)
