"""Which addresses a validator may connect to for a peer's bucket (the SSRF rules).

A commitment is written by a peer: its host may be, or resolve to, the validator's own machine, its
cloud's metadata service (169.254.169.254) or its private network. On a real network every address
a host resolves to must be globally routable; one that is not makes the whole host `BadCommitment`
(so a name that round-robins a public and a private address cannot slip through), and the reader
connects to the very address checked here, never resolving again (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

from .base import PeerTimeout
from .commitment import BadCommitment

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64, v4-compatible)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (int(ip) >> 32 == 0 and int(ip) > 1):  # not :: and ::1 themselves
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: IPAddress) -> str | None:
    """Why a peer read may not go to `ip` on a real network, or None if it may."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return "local-use NAT64"
        v4 = _embedded_v4(ip)
        if v4 is not None:
            candidates.insert(0, v4)  # the IPv4 address it reaches names the reason best
    for a in candidates:
        for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
            if getattr(a, f"is_{name}"):
                return name.replace("_", "-")
        if isinstance(a, ipaddress.IPv4Address) and a in _CGNAT:
            return "shared (CGNAT)"
        if not a.is_global:
            return "not globally routable"
    return None


def check_ip(ip: IPAddress, host: str, *, allow_private: bool, plain_http: bool) -> IPAddress:
    """`ip` if a peer read may connect to it; BadCommitment otherwise."""
    if plain_http and not ip.is_loopback:
        raise BadCommitment(f"{host}: plain http only to loopback, not {ip}")
    if not allow_private:
        why = refusal(ip)
        if why is not None:
            raise BadCommitment(f"{host}: resolves to a {why} address ({ip})")
    return ip


def literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def resolve(host: str, port: int, deadline: float) -> list[IPAddress]:
    """Every address `host` resolves to, waiting no later than `deadline` (getaddrinfo cannot be
    interrupted: it runs in a daemon thread, left to the resolver's own timeout if we give up)."""
    ip = literal_ip(host)
    if ip is not None:
        return [ip]
    out: list[object] = []
    ready = threading.Event()

    def lookup() -> None:
        try:
            out.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as e:
            out.append(e)
        ready.set()

    threading.Thread(target=lookup, daemon=True, name="resolve").start()
    if not ready.wait(max(0.0, deadline - time.monotonic())):
        raise PeerTimeout(f"{host}: name not resolved by the deadline")
    answer = out[0]
    if isinstance(answer, BaseException):
        raise BadCommitment(f"{host}: does not resolve ({type(answer).__name__})")
    addrs: list[IPAddress] = []
    for *_, sockaddr in answer:  # type: ignore[union-attr]
        a = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if a not in addrs:
            addrs.append(a)
    if not addrs:
        raise BadCommitment(f"{host}: no address")
    return addrs


def checked_addresses(
    host: str, port: int, deadline: float, *, allow_private: bool, plain_http: bool
) -> list[IPAddress]:
    """The addresses to connect to for `host`, each one checked; BadCommitment if any is refused."""
    return [
        check_ip(a, host, allow_private=allow_private, plain_http=plain_http)
        for a in resolve(host, port, deadline)
    ]
