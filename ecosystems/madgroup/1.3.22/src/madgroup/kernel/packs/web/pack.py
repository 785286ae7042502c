"""The web pack: Marco's window on the public web, one guarded GET at a time.

A MAD that owns `web` may fetch a page (`web.fetch`) and ask whether robots.txt lets it (`web.robots`).
The danger of a fetcher inside an ecosystem is not the web: it is everything else the host can reach
(SSRF). The cloud's metadata service hands out credentials at 169.254.169.254, the ecosystem's own
gateway listens on 127.0.0.1, databases and admin panels sit on 10.x and 192.168.x. So the pack never
lets a caller's URL decide where a connection goes. For every URL, and again for every redirect hop:

- Only `http` and `https`; no userinfo (`user:pass@`); a port from 1 to 65535; a host that is an IP
  literal in canonical form or a plain DNS name. A host whose last label is a number is an IPv4 address
  to every URL parser and resolver, so the odd spellings (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`)
  are refused outright, never resolved. `localhost` and `*.localhost` (RFC 6761) are refused without
  asking a resolver.
- The host is resolved once (getaddrinfo, in a thread: `resolve` below) and EVERY address it resolves to
  must be public: loopback, RFC 1918, link-local (the metadata addresses among them), unspecified,
  multicast, reserved, CGNAT (100.64/10), benchmarking, documentation, ULA and site-local, and the IPv6
  forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4) when what they carry is not public,
  are all refused. One bad address refuses the URL: a name that resolves to a public and a private
  address is an attack, not a mirror.
- The connection goes to the address that was checked, never to a second resolution (the defence against
  DNS rebinding): the request is sent to `http(s)://<checked IP>:<port>/...` with the `Host` header set to
  the real host, and for https the TLS server name (SNI, and the name the certificate is verified
  against) set to the real host through httpcore's `sni_hostname` extension. Every hop gets a fresh
  client with no connection reuse and no cookie jar kept, and `trust_env=False`: proxies and netrc from
  the environment are ignored (a proxy would resolve the name again, out of our sight).
- The operator may open holes with the setting `allow`: IP addresses, CIDR networks and host names
  (`*.example.org` for its subdomains), each optionally with `:port` (`[v6]:port` for IPv6). A host entry
  lets every address that host resolves to through; an address or network entry lets those addresses
  through, under any host name. The cloud metadata addresses are the exception: only an entry naming
  that exact address (not a network, not a host name) opens them.
- Redirects (301, 302, 303, 307, 308) are followed by the pack itself, at most `max_redirects`, each hop
  checked again from scratch (scheme, userinfo, host spelling, every address, allow-list, robots.txt).
  A loop is an error as soon as a URL comes back.
- robots.txt (RFC 9309) is obeyed for the product token of `user_agent`: fetched through the same
  guarded path (its own redirects checked too, at most 5), read up to 500 KiB (the rest ignored), cached
  per origin for `robots_ttl_seconds` (a failure for at most a minute). 4xx (except 429) means no rules:
  allowed; 5xx, 429, a refused redirect or no answer means "unreachable": everything disallowed. Rules
  are matched the RFC's way (most specific match wins, Allow on a tie, `*` and `$`, percent-encoding
  normalised); urllib.robotparser is not used because it takes the first match, ignores `*` and `$`,
  and treats 401/403 as "disallow all".
- Limits: `max_bytes` of body (after content decoding, so a compression bomb is cut too): a declared
  Content-Length over it is refused before the body is read, and a body that grows past it is refused
  when it does. A page is never returned truncated: half a page reads like a whole one. The pack reads
  the raw bytes off the wire and decodes them itself, never more than the bytes still allowed
  (zlib's `max_length`): one Content-Encoding layer of gzip or deflate (or none); any other coding, or
  a stack of them (`gzip, gzip`), is a failure of the site, audited, and never decoded. `timeout_seconds`
  bounds the whole call (resolution, robots.txt, every hop, extraction); `connect_timeout_seconds` each
  connection. Requests carry a User-Agent, Accept, Accept-Encoding (gzip, deflate) and Host, nothing else.
- Extraction (trafilatura) runs in the pack's own two threads, never the event loop's default pool, so
  a page that takes long to extract cannot starve the rest of the kernel; a page of HTML over
  `max_extract_bytes` is not given to trafilatura at all: its text comes from a plain walk of the parsed
  page instead (linear, no main-text detection). robots.txt rules are matched in linear time, and at
  most the first ROBOTS_MAX_RULES rules of a group (of at most ROBOTS_MAX_RULE_CHARS each) count.
- A charset is honoured only when it is one of the web's text encodings; anything else (idna,
  punycode, the escape codecs...) is read as UTF-8.
- Only text comes back: HTML (as markdown or text extracted by trafilatura, or raw), `text/*`, JSON, XML,
  JavaScript, YAML. A binary type (an image, a PDF, `application/octet-stream`) is refused from its
  headers, before its body is read, with the type named.

Refusals of a guard (scheme, userinfo, odd hosts, non-public addresses, robots.txt, limits) go through
`context.denied`, which audits them, with the refused URL as subject. Every fetch that reached the
network is audited as well, ok or not (URL, status, size, sha256): the ecosystem's egress trail; so is every
robots.txt the pack downloads (action `web.robots`, its URL, the redirects it took, ok or not). Bad input
(a malformed URL, an unknown format) is InvalidArgument; a name that does not resolve is NotFound; a site
that fails (no connection, TLS, timeout, a redirect loop) is a KernelError that says which.

What it cannot stop: resolving a name is itself a DNS query the caller chose, so a host name can carry a
few bytes out through DNS even when the fetch is refused.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import hashlib
import ipaddress
import re
import socket
import ssl
import string
import time
import urllib.parse
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from ...errors import InvalidArgument, KernelError, NotFound
from .. import Pack, PackContext, implements

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULTS: dict[str, Any] = {
    "allow": [],  # IPs, CIDR networks, host names (*.suffix), each optionally with :port
    "user_agent": "regen-web/1 (+marco)",
    "max_bytes": 5 << 20,  # 5 MiB of body
    "max_redirects": 5,
    "timeout_seconds": 20.0,  # the whole call
    "connect_timeout_seconds": 10.0,  # each connection
    "robots_ttl_seconds": 3600.0,
    "max_extract_bytes": 1 << 20,  # HTML given to trafilatura; a larger page gets a plain text walk
}
FORMATS = ("markdown", "text", "raw")
MAX_URL = 8192
MAX_REDIRECTS_CEILING = 20
ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309: parse at least the first 500 KiB
ROBOTS_MAX_REDIRECTS = 5  # RFC 9309: follow at least five
ROBOTS_FAILURE_TTL = 60.0  # an unreachable robots.txt is asked again after at most a minute
ROBOTS_CACHE_SIZE = 1024  # origins
ROBOTS_MAX_RULES = 2048  # of the chosen group: the rest are ignored (matching stays bounded)
ROBOTS_MAX_RULE_CHARS = 4096  # a longer (normalised) rule is ignored
POOL_THREADS = 2  # the pack's own threads for extraction and robots.txt parsing
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 << 10

# ---- which addresses are public ------------------------------------------------------------------------

_net = ipaddress.ip_network
METADATA: frozenset[IPAddress] = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
    "169.254.170.2",  # AWS ECS task metadata
    "100.100.100.200",  # Alibaba Cloud
    "fd00:ec2::254",  # AWS over IPv6
))
_V4_REFUSED: tuple[tuple[IPNetwork, str], ...] = (
    (_net("0.0.0.0/8"), "an unspecified ('this network') address"),
    (_net("10.0.0.0/8"), "a private address (RFC 1918)"),
    (_net("100.64.0.0/10"), "a carrier-grade NAT address (RFC 6598)"),
    (_net("127.0.0.0/8"), "a loopback address"),
    (_net("169.254.0.0/16"), "a link-local address"),
    (_net("172.16.0.0/12"), "a private address (RFC 1918)"),
    (_net("192.0.0.0/24"), "an IETF protocol assignment (RFC 6890)"),
    (_net("192.0.2.0/24"), "a documentation address (TEST-NET-1)"),
    (_net("192.88.99.0/24"), "a 6to4 relay anycast address (deprecated)"),
    (_net("192.168.0.0/16"), "a private address (RFC 1918)"),
    (_net("198.18.0.0/15"), "a benchmarking address (RFC 2544)"),
    (_net("198.51.100.0/24"), "a documentation address (TEST-NET-2)"),
    (_net("203.0.113.0/24"), "a documentation address (TEST-NET-3)"),
    (_net("224.0.0.0/4"), "a multicast address"),
    (_net("240.0.0.0/4"), "a reserved address (240/4, broadcast included)"),
)
_V6_REFUSED: tuple[tuple[IPNetwork, str], ...] = (
    (_net("64:ff9b:1::/48"), "a local-use NAT64 address (RFC 8215)"),
    (_net("100::/64"), "a discard-only address (RFC 6666)"),
    (_net("2001::/23"), "an IETF protocol assignment (Teredo, benchmarking, ORCHID...)"),
    (_net("2001:db8::/32"), "a documentation address"),
    (_net("3fff::/20"), "a documentation address"),
    (_net("5f00::/16"), "a segment-routing SID (RFC 9602)"),
    (_net("fc00::/7"), "a unique local address (the IPv6 private range)"),
    (_net("fe80::/10"), "a link-local address"),
    (_net("fec0::/10"), "a site-local address (deprecated)"),
    (_net("ff00::/8"), "a multicast address"),
)
_V6_GLOBAL_UNICAST = _net("2000::/3")
_NAT64 = _net("64:ff9b::/96")
_V4_COMPATIBLE = _net("::/96")


def _embedded_v4(addr: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address carries, and the form it is carried in."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped, "IPv4-mapped"
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "NAT64"
    if addr.sixtofour is not None:
        return addr.sixtofour, "6to4"
    if addr in _V4_COMPATIBLE and int(addr) > 1:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "IPv4-compatible"
    return None


def not_public(addr: IPAddress) -> str | None:
    """Why `addr` is not a public address (a phrase such as "a loopback address"), or None when it is."""
    if addr in METADATA:
        return "a cloud metadata endpoint"
    if isinstance(addr, ipaddress.IPv4Address):
        for network, why in _V4_REFUSED:
            if addr in network:
                return why
        return None if addr.is_global else "not a globally routable address"
    if addr.scope_id:
        return "a scoped (interface-bound) address"
    if addr == ipaddress.IPv6Address("::1"):
        return "a loopback address"
    if addr == ipaddress.IPv6Address("::"):
        return "an unspecified address"
    embedded = _embedded_v4(addr)
    if embedded is not None:
        v4, form = embedded
        if form == "IPv4-compatible":
            return f"an IPv4-compatible form of {v4} (deprecated, never fetched)"
        why = not_public(v4)
        return None if why is None else f"the {form} form of {v4}, {why}"
    for network, why in _V6_REFUSED:
        if addr in network:
            return why
    if addr not in _V6_GLOBAL_UNICAST:
        return "a reserved address (outside the global unicast range 2000::/3)"
    return None


def _canonical(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address is its IPv4 address (checked and connected to as such)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, in the resolver's order (blocking: called in a thread). Tests
    replace this function; nothing else in the pack resolves a name."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """The TLS context of every https connection: certificates verified (certifi's roots, or SSL_CERT_FILE /
    SSL_CERT_DIR), host names checked. Made once: loading the roots takes a tenth of a second."""
    return httpx.create_ssl_context()


# ---- host names ------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def _numeric(host: str) -> bool:
    """Whether a URL parser or resolver would read `host` as an IPv4 address: its last label is a number
    (decimal, octal or hex), as in the WHATWG URL standard and inet_aton."""
    last = host.rstrip(".").rsplit(".", 1)[-1]
    return bool(last) and _NUMBER.fullmatch(last) is not None


def _dotted_quad(host: str) -> bool:
    """Whether `host` is an IPv4 address in its one unambiguous spelling: four decimal numbers, no leading zeros."""
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


def _odd_ipv4(host: str, given: str) -> str:
    return (f"host {host!r} of {_shown(given)} spells an IPv4 address in a form resolvers and parsers read "
            "differently (decimal, octal or hex numbers, or parts left out, as in 2130706433, 0x7f.1, 0177.0.0.1 or "
            "127.1); write the address as four decimal numbers, a.b.c.d")


def _valid_hostname(host: str) -> bool:
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _bare(host: str) -> str:
    return host.rstrip(".")


# ---- the allow-list ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Allowed:
    """One entry of the `allow` setting."""

    text: str
    host: str = ""  # an exact host name, or the suffix of `*.suffix` (with wildcard)
    wildcard: bool = False
    network: IPNetwork | None = None
    port: int | None = None  # None: any port

    def _port_ok(self, port: int) -> bool:
        return self.port is None or self.port == port

    def admits_host(self, host: str, port: int) -> bool:
        if not self.host or not self._port_ok(port):
            return False
        host = _bare(host)
        return host.endswith("." + self.host) if self.wildcard else host == self.host

    def admits_address(self, addr: IPAddress, port: int) -> bool:
        if self.network is None or not self._port_ok(port) or addr.version != self.network.version:
            return False
        if addr in METADATA:  # only an entry naming exactly this address opens a metadata endpoint
            return self.network.num_addresses == 1 and self.network.network_address == addr
        return addr in self.network


def _parse_allowed(entry: Any) -> _Allowed:
    def bad(why: str) -> KernelError:
        return KernelError(f"pack setting web.allow: entry {entry!r} {why}. An entry is an IP address "
                           "('203.0.113.7', '2001:db8::7'), a CIDR network ('10.1.0.0/16'), or a host name "
                           "('intranet.example', '*.example.org'), each optionally with ':port' ('[::1]:8080' for "
                           "IPv6)")

    if not isinstance(entry, str) or not entry.strip():
        raise bad("is not a non-empty string")
    text = entry.strip().lower()
    port_text = ""
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise bad("has an unclosed or misplaced '['")
        text, port_text = inside, rest[1:]
        if not rest:
            port_text = ""
        elif not port_text:
            raise bad("has an empty port")
    elif text.count(":") == 1:
        text, port_text = text.split(":")
        if not port_text:
            raise bad("has an empty port")
    port = None
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise bad(f"has port {port_text!r}, not a number from 1 to 65535")
        port = int(port_text)
    try:
        if "/" in text:
            return _Allowed(entry, network=ipaddress.ip_network(text, strict=False), port=port)
        return _Allowed(entry, network=ipaddress.ip_network(ipaddress.ip_address(text)), port=port)
    except ValueError:
        if "/" in text or ":" in text:
            raise bad("is not a valid IP address or network") from None
    wildcard = text.startswith("*.")
    name = _bare(text[2:] if wildcard else text)
    if _numeric(name):
        raise bad("spells an IPv4 address in a form resolvers read differently; write it as a.b.c.d")
    if not _valid_hostname(name):
        raise bad("is not a valid host name")
    return _Allowed(entry, host=name, wildcard=wildcard, port=port)


# ---- robots.txt (RFC 9309) ---------------------------------------------------------------------------------

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)


def _normalise(text: str) -> str:
    """Percent-encoding made comparable (RFC 9309 2.2.2): non-ASCII and controls encoded as UTF-8,
    an encoded unreserved character decoded, hex digits upper-cased."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%" and i + 2 < len(text) and text[i + 1] in _HEX and text[i + 2] in _HEX:
            decoded = chr(int(text[i + 1:i + 3], 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + text[i + 1:i + 3].upper())
            i += 3
            continue
        if ord(ch) > 0x7E or ord(ch) <= 0x20:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _glob(pattern: str, text: str) -> bool:
    """Whether `text` starts with something `pattern` matches: `*` any run of characters, a final `$` the
    end. Linear: the pattern is cut at its `*`s and each piece found left to right (str.find), which is
    exact for wildcards (the leftmost place of a piece leaves the most room for the rest). Never a regex
    and never backtracking: robots.txt is written by strangers."""
    anchored = pattern.endswith("$")
    if anchored:
        pattern = pattern[:-1]
    pieces = pattern.split("*")
    first = pieces[0]
    if not text.startswith(first):
        return False
    if len(pieces) == 1:
        return len(text) == len(first) if anchored else True
    pos = len(first)
    for piece in pieces[1:-1]:
        if piece:
            found = text.find(piece, pos)
            if found < 0:
                return False
            pos = found + len(piece)
    last = pieces[-1]
    if anchored:
        return len(text) - len(last) >= pos and text.endswith(last)
    return text.find(last, pos) >= 0


@dataclass(frozen=True)
class _Rule:
    allow: bool
    pattern: str  # normalised
    line: int
    text: str  # as written, for the reason

    @property
    def shown(self) -> str:
        return f"'{'Allow' if self.allow else 'Disallow'}: {self.text}' (line {self.line})"


@dataclass
class _Robots:
    """What one origin's robots.txt says, for one product token."""

    status: int  # of the robots.txt fetch; 0 when unreachable
    blanket: bool | None  # True: everything allowed (4xx), False: nothing (unreachable), None: the rules
    why: str
    rules: tuple[_Rule, ...] = ()
    group: str = ""  # the user-agent group the rules came from
    failure: str = ""  # no answer at all (connection, TLS, timeout): the site failed, never cached

    def verdict(self, path: str) -> tuple[bool, str, str]:
        """(allowed, reason, rule) for a path-and-query."""
        if self.blanket is not None:
            return self.blanket, self.why, ""
        if path.split("?", 1)[0] == "/robots.txt":
            return True, "robots.txt itself is always allowed (RFC 9309)", ""
        target = _normalise(path)
        best: _Rule | None = None
        for rule in self.rules:
            if _glob(rule.pattern, target):
                longer = best is None or len(rule.pattern) > len(best.pattern)
                if longer or (len(rule.pattern) == len(best.pattern) and rule.allow and not best.allow):
                    best = rule
        if best is None:
            return True, f"{self.why}: no rule of the {self.group} group matches {path!r}", ""
        word = "allows" if best.allow else "disallows"
        return best.allow, f"{self.why}: {best.shown} in the {self.group} group {word} {path!r}", best.shown


def parse_robots(text: str, product: str) -> tuple[str, tuple[_Rule, ...]]:
    """The rules of `product`'s groups in a robots.txt (or of the `*` groups when none names it): the name
    of the group chosen and its rules, all of them, in order (RFC 9309 2.2.1: groups for the same agent
    combine)."""
    product = product.lower()
    wanted = (product, "*")
    groups: dict[str, list[_Rule]] = {}
    agents: list[str] = []
    in_rules = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("user-agent", "useragent", "user agent"):
            if in_rules:
                agents, in_rules = [], False
            token = re.match(r"[A-Za-z_*-]*", value)
            agent = token.group(0).lower() if token else ""
            if agent in wanted and agent not in agents:  # only these groups are ever used
                agents.append(agent)
        elif key in ("allow", "disallow"):
            in_rules = True
            if not agents or (key == "disallow" and not value):
                continue  # a rule outside any group (or one not ours), or an empty Disallow (no rule)
            if not value.startswith(("/", "*")):
                value = "/" + value
            if len(value) > ROBOTS_MAX_RULE_CHARS:
                continue
            pattern = _normalise(value)
            if len(pattern) > ROBOTS_MAX_RULE_CHARS:
                continue
            rule = _Rule(key == "allow", pattern, number, value)
            for agent in agents:
                kept = groups.setdefault(agent, [])
                if len(kept) < ROBOTS_MAX_RULES:
                    kept.append(rule)
    if product in groups:
        return f"'{product}'", tuple(groups[product])
    if "*" in groups:
        return "'*'", tuple(groups["*"])
    return "", ()


# ---- the result of one request ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """A URL that passed the checks, with the addresses it may be fetched from."""

    url: httpx.URL
    host: str  # ASCII (IDNA), lower case, no brackets
    port: int
    literal: bool  # the host is an IP address
    addresses: tuple[IPAddress, ...]

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.url.scheme, _bare(self.host), self.port

    @property
    def host_header(self) -> str:
        shown = f"[{self.host}]" if self.literal and ":" in self.host else self.host
        default = 443 if self.url.scheme == "https" else 80
        return shown if self.port == default else f"{shown}:{self.port}"

    @property
    def path(self) -> str:
        return self.url.raw_path.decode("ascii")

    def via(self, addr: IPAddress) -> str:
        shown = f"[{addr}]" if addr.version == 6 else str(addr)
        return f"{self.url.scheme}://{shown}:{self.port}{self.path}"


@dataclass
class _Reply:
    status: int
    headers: httpx.Headers
    body: bytes = b""
    location: str | None = None
    truncated: bool = False


@dataclass
class _Trail:
    """What one fetch did: the URLs that redirected, and whether a connection was attempted."""

    hops: list[str] = field(default_factory=list)
    contacted: bool = False
    note: str = ""  # what the last answer was (robots.txt: its size and digest)


class _Refusal(Exception):
    """A guard said no; turned into `context.denied(...)` at the capability's edge (which audits it)."""

    def __init__(self, url: Any, why: str):
        super().__init__(why)
        self.url = url
        self.why = why


def _shown(url: Any) -> str:
    """The URL as given, for the audit log: verbatim when printable and short, else its repr, cut."""
    if isinstance(url, str) and url.isprintable() and len(url) <= 512:
        return url
    text = repr(url)
    return text if len(text) <= 512 else text[:509] + "..."


# ---- content --------------------------------------------------------------------------------------------

_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_TEXT_APPLICATION_TYPES = frozenset({
    "application/json", "application/xml", "application/javascript", "application/ecmascript",
    "application/x-javascript", "application/yaml", "application/x-yaml", "application/toml",
    "application/x-ndjson", "application/sql", "application/graphql", "application/x-sh",
})
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _kind(media_type: str) -> str | None:
    """'html', 'text', '' (no type given: decided from the body) or None (binary)."""
    if not media_type:
        return ""
    if media_type in _HTML_TYPES:
        return "html"
    if (media_type.startswith("text/") or media_type in _TEXT_APPLICATION_TYPES
            or media_type.endswith(("+json", "+xml", "+yaml"))):
        return "text"
    return None


# The charsets a page may name (the web's encodings, by Python's codec names); anything else (idna, punycode,
# unicode_escape, rot13...) is not a text encoding of the web and some raise even with errors="replace".
_WEB_ENCODINGS = frozenset(codecs.lookup(n).name for n in (
    "utf-8 utf-8-sig utf-16 utf-16-le utf-16-be ascii latin-1 iso8859-2 iso8859-3 iso8859-4 iso8859-5 iso8859-6 "
    "iso8859-7 iso8859-8 iso8859-9 iso8859-10 iso8859-11 iso8859-13 iso8859-14 iso8859-15 iso8859-16 cp1250 cp1251 "
    "cp1252 cp1253 cp1254 cp1255 cp1256 cp1257 cp1258 cp874 cp866 koi8-r koi8-u mac-roman mac-cyrillic gbk gb2312 "
    "gb18030 big5 big5hkscs euc-jp euc-kr iso2022-jp iso2022-kr shift_jis cp932 cp949 cp950 tis-620").split())


def _text_encoding(name: str) -> str | None:
    try:
        info = codecs.lookup(name)
    except (LookupError, UnicodeError, ValueError):
        return None
    return info.name if info.name in _WEB_ENCODINGS else None


def _decode(body: bytes, content_type: str, html: bool) -> str:
    """The body as text: a BOM, else the Content-Type charset, else (HTML) a <meta> charset, else UTF-8;
    undecodable bytes replaced."""
    for bom, name in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if body.startswith(bom):
            return body.decode(name, errors="replace")
    encoding = None
    match = re.search(r"charset\s*=\s*\"?([^\";\s]+)", content_type, re.IGNORECASE)
    if match:
        encoding = _text_encoding(match.group(1))
    if encoding is None and html:
        meta = _META_CHARSET.search(body[:4096])
        if meta:
            encoding = _text_encoding(meta.group(1).decode("ascii"))
    try:
        return body.decode(encoding or "utf-8", errors="replace")
    except (UnicodeError, LookupError):  # belt and braces: a codec that fails even with errors="replace"
        return body.decode("utf-8", errors="replace")


def _looks_like_html(text: str) -> bool:
    head = text.lstrip("\ufeff \t\r\n")[:512].lower()
    return head.startswith(("<!doctype html", "<html")) or "<html" in head


def _plain_text(tree: Any) -> str:
    """All of a parsed page's text, scripts and styles left out: a linear walk, for pages too large for
    trafilatura (`max_extract_bytes`)."""
    from lxml import etree

    etree.strip_elements(tree, "script", "style", "noscript", "template", with_tail=False)
    body = tree.find(".//body")
    return " ".join(" ".join((body if body is not None else tree).itertext()).split())


def _render(text: str, fmt: str, url: str, max_extract: int = DEFAULTS["max_extract_bytes"]) -> tuple[str, str]:
    """(title, content) of an HTML page: the main text as markdown or plain text (trafilatura), falling back
    to all of the page's text when it finds no main text; or the HTML as served ('raw'). A page over
    `max_extract` bytes of UTF-8 is never given to trafilatura: all of its text, from a plain walk."""
    # trafilatura (about 100 ms and 20 MB with lxml) is imported on the first page, not when the runtime starts
    import trafilatura
    from trafilatura.metadata import extract_metadata
    from trafilatura.utils import load_html

    large = len(text) > max_extract or len(text.encode("utf-8", "surrogatepass")) > max_extract
    tree = load_html(text)
    title = ""
    if tree is not None:
        title = " ".join((tree.findtext(".//title") or "").split())
        if not title and not large:
            try:
                title = " ".join((extract_metadata(text, default_url=url, extensive=False).title or "").split())
            except Exception:  # noqa: BLE001 - metadata is a nicety; a page it chokes on still has content
                title = ""
    if fmt == "raw":
        return title, text
    if large:
        return title, _plain_text(tree) if tree is not None else ""
    content = trafilatura.extract(text, url=url, output_format="markdown" if fmt == "markdown" else "txt",
                                  include_links=fmt == "markdown", include_tables=True, include_comments=False,
                                  include_formatting=fmt == "markdown")
    if not content and tree is not None:
        content = trafilatura.html2txt(text)
    if not content:  # a fragment trafilatura will not take as a page: all of its text, wrapped as one
        content = trafilatura.html2txt(f"<html><body><div>{text}</div></body></html>").strip()
    return title, content


# ---- content codings ------------------------------------------------------------------------------------

_CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}


def _content_coding(shown: str, headers: httpx.Headers) -> str:
    """The one Content-Encoding of a reply ('identity', 'gzip' or 'deflate'); anything else is the site's
    failure: a stack of codings (`gzip, gzip`) multiplies a bomb, an unknown one cannot be read."""
    named = [v.strip().lower() for v in ",".join(headers.get_list("content-encoding")).split(",")]
    codings = [v for v in named if v and v != "identity"]
    if not codings:
        return "identity"
    if len(codings) == 1 and codings[0] in _CODINGS:
        return _CODINGS[codings[0]]
    given = ", ".join(codings)
    raise KernelError(f"{shown} sent its body with Content-Encoding {_shown(given)!r}; the web pack reads only one "
                      "layer of gzip or deflate (or none), never a stack of codings or another one")


class _Decoder:
    """Decodes a body's one content coding, never producing more than the caller has room for (plus one
    byte, which says the room is exceeded): a compression bomb costs at most the limit."""

    def __init__(self, coding: str):
        self.coding = coding
        self.fed = False
        self.obj: Any = None
        if coding == "gzip":
            self.obj = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif coding == "deflate":
            self.obj = zlib.decompressobj(zlib.MAX_WBITS)  # zlib-wrapped; raw deflate tried when that fails

    def feed(self, shown: str, data: bytes, room: int) -> bytes:
        if self.obj is None:
            return data
        if not data or self.obj.eof:
            return b""  # bytes after the end of the stream are ignored (as browsers do)
        first, self.fed = not self.fed, True
        try:
            return self.obj.decompress(data, max(room, 0) + 1)
        except zlib.error as exc:
            error = exc
        if first and self.coding == "deflate":  # servers send raw deflate under that name too
            self.obj = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                return self.obj.decompress(data, max(room, 0) + 1)
            except zlib.error as exc:
                error = exc
        raise KernelError(f"{shown} sent a body that is not valid {self.coding} ({error})")

    def finish(self, shown: str, wire: int) -> None:
        if self.obj is not None and wire and not self.obj.eof:
            raise KernelError(f"{shown} sent a {self.coding} body that ends before its compressed stream does")


# ---- the pack -------------------------------------------------------------------------------------------


def _number(key: str, value: Any, *, minimum: float, maximum: float, whole: bool, strict_min: bool) -> Any:
    ok_type = not isinstance(value, bool) and (isinstance(value, int) if whole else isinstance(value, (int, float)))
    in_range = ok_type and (value > minimum if strict_min else value >= minimum) and value <= maximum
    if not in_range:
        kind = "a whole number" if whole else "a number"
        low = f"more than {minimum}" if strict_min else f"at least {minimum}"
        raise KernelError(f"pack setting web.{key} must be {kind} {low} and at most {maximum}, not {value!r} "
                          f"(default {DEFAULTS[key]!r})")
    return value


@dataclass
class _Cache:
    entries: OrderedDict[tuple[str, str, int], tuple[float, _Robots]] = field(default_factory=OrderedDict)
    locks: dict[tuple[str, str, int], asyncio.Lock] = field(default_factory=dict)


class WebPack(Pack):
    """The `web.*` capabilities: guarded GETs of public web pages."""

    name = "web"
    libraries = ("trafilatura", "lxml")

    def __init__(self, context: PackContext):
        super().__init__(context)
        settings = dict(context.settings)
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            raise KernelError(f"unknown pack setting(s) {', '.join('web.' + k for k in unknown)}; the web pack's "
                              f"settings are {', '.join(sorted(DEFAULTS))}")
        get = lambda key: settings.get(key, DEFAULTS[key])  # noqa: E731
        allow = get("allow")
        if not isinstance(allow, (list, tuple)):
            raise KernelError(f"pack setting web.allow must be a list of addresses, networks or host names, not "
                              f"{allow!r} (default [])")
        self._allow = tuple(_parse_allowed(entry) for entry in allow)
        agent = get("user_agent")
        token = re.match(r"[A-Za-z_-]+", agent) if isinstance(agent, str) else None
        if (token is None or not agent.isascii() or not agent.isprintable() or len(agent) > 256):
            raise KernelError(f"pack setting web.user_agent must be printable ASCII of at most 256 characters "
                              f"starting with a product token (letters, '-', '_'), such as {DEFAULTS['user_agent']!r}, "
                              f"not {agent!r}")
        self._agent = agent
        self._product = token.group(0).lower()
        self._max_bytes = _number("max_bytes", get("max_bytes"), minimum=0, maximum=1 << 40, whole=True,
                                  strict_min=True)
        self._max_redirects = _number("max_redirects", get("max_redirects"), minimum=0,
                                      maximum=MAX_REDIRECTS_CEILING, whole=True, strict_min=False)
        self._timeout = float(_number("timeout_seconds", get("timeout_seconds"), minimum=0, maximum=3600,
                                      whole=False, strict_min=True))
        self._connect_timeout = float(_number("connect_timeout_seconds", get("connect_timeout_seconds"),
                                              minimum=0, maximum=3600, whole=False, strict_min=True))
        self._robots_ttl = float(_number("robots_ttl_seconds", get("robots_ttl_seconds"), minimum=0,
                                         maximum=30 * 86400, whole=False, strict_min=False))
        self._max_extract = _number("max_extract_bytes", get("max_extract_bytes"), minimum=0, maximum=1 << 40,
                                    whole=True, strict_min=True)
        self._ssl = ssl_context()
        self._robots = _Cache()
        # The pack's own threads (extraction, robots.txt parsing): work that outlives its call's timeout
        # (a thread cannot be stopped) holds one of these, never the default pool the kernel shares.
        self._pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="web-pack")

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    # ---- checking a URL ------------------------------------------------------------------------------

    async def _check(self, given: Any) -> _Target:
        """The URL parsed and every address its host resolves to checked, or a refusal."""
        if not isinstance(given, str):
            raise InvalidArgument(f"a URL must be a string, not {type(given).__name__}")
        if not given or len(given) > MAX_URL:
            raise InvalidArgument(f"a URL has 1 to {MAX_URL} characters; this one has {len(given)}")
        if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in given):
            raise InvalidArgument(f"URL {_shown(given)} contains whitespace or a control character; percent-encode it")
        try:  # before httpx parses it: some odd IPv4 spellings are an InvalidURL there, others a "name"
            early = urllib.parse.urlsplit(given).hostname or ""
        except ValueError:
            early = ""
        if early and ":" not in early and _numeric(early) and not _dotted_quad(early):
            raise _Refusal(given, _odd_ipv4(early, given))
        try:
            url = httpx.URL(given)
        except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
            raise InvalidArgument(f"{_shown(given)} is not a valid URL ({exc}); write it as "
                                  "'https://host/path'") from None
        scheme = url.scheme
        if not scheme:
            raise InvalidArgument(f"{_shown(given)} is not an absolute URL; write it as 'https://host/path'")
        if scheme not in ("http", "https"):
            raise _Refusal(given, f"{_shown(given)} uses the {scheme!r} scheme; the web pack fetches only http and "
                                  "https URLs")
        if url.userinfo:
            raise _Refusal(given, f"{_shown(given)} carries a user name or password ('user:pass@'); the web pack never "
                                  "sends credentials in a URL: remove them")
        host = url.raw_host.decode("ascii").lower()
        if not host:
            raise InvalidArgument(f"{_shown(given)} has no host; write it as 'https://host/path'")
        port = url.port if url.port is not None else (443 if scheme == "https" else 80)
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"{_shown(given)} has port {port}; a port is a number from 1 to 65535")
        url = url.copy_with(fragment=None)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is None:
            if _numeric(host):
                raise _Refusal(given, _odd_ipv4(host, given))
            if not _valid_hostname(host):
                raise InvalidArgument(f"host {host!r} of {_shown(given)} is not a valid DNS name (letters, digits, "
                                      "'-' and '_' in dot-separated labels)")
        host_allowed = literal is None and any(a.admits_host(host, port) for a in self._allow)
        if literal is not None:
            found = [literal]
        else:
            if _bare(host) == "localhost" or _bare(host).endswith(".localhost"):
                if not host_allowed:
                    raise _Refusal(given, f"{_shown(given)} names {host!r}, which is this machine (RFC 6761); the "
                                          "web pack reaches only public hosts")
            try:
                answers = await asyncio.to_thread(resolve, host, port)
            except (OSError, UnicodeError) as exc:
                raise NotFound(f"host {host!r} of {_shown(given)} does not resolve "
                               f"({getattr(exc, 'strerror', None) or exc}); check its spelling") from None
            found = []
            for answer in answers:
                try:
                    found.append(ipaddress.ip_address(answer))
                except ValueError:
                    raise KernelError(f"host {host!r} resolved to {answer!r}, which is not an IP address") from None
            if not found:
                raise NotFound(f"host {host!r} of {_shown(given)} resolves to no address")
        checked: list[IPAddress] = []
        for addr in (_canonical(a) for a in found):
            if addr in checked:
                continue
            allowed = any(a.admits_address(addr, port) for a in self._allow)
            if not allowed and host_allowed and addr not in METADATA:
                allowed = True
            if not allowed:
                why = not_public(addr)
                if why is not None:
                    whose = "is" if literal is not None else f"resolves to {addr}, which is"
                    raise _Refusal(given, f"{_shown(given)} {whose} {why}; the web pack reaches only public "
                                          "addresses. An operator can open it with the pack setting web.allow")
            checked.append(addr)
        return _Target(url=url, host=host, port=port, literal=literal is not None, addresses=tuple(checked))

    # ---- one request ------------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            trust_env=False, follow_redirects=False, verify=self._ssl, http2=False,
            timeout=httpx.Timeout(self._timeout, connect=min(self._connect_timeout, self._timeout)),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
            headers={"User-Agent": self._agent, "Accept-Encoding": "gzip, deflate", "Connection": "close",
                     "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,application/json;q=0.9,"
                               "*/*;q=0.1"})

    async def _get(self, target: _Target, limit: int, *, robots: bool = False, trail: _Trail | None = None) -> _Reply:
        """GET `target` from one of its checked addresses (in order, until one connects). A page: a binary
        type refused before the body, a body over `limit` refused. robots.txt: any type, cut at `limit`."""
        shown = str(target.url)
        extensions = {} if target.literal or target.url.scheme != "https" else {"sni_hostname": _bare(target.host)}
        failure: Exception | None = None
        async with self._client() as client:
            for addr in target.addresses:
                if trail is not None:
                    trail.contacted = True
                request = client.build_request("GET", target.via(addr), headers={"Host": target.host_header},
                                               extensions=extensions)
                try:
                    response = await client.send(request, stream=True)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    failure = exc
                    continue
                except httpx.HTTPError as exc:
                    raise KernelError(f"fetching {shown} failed: {_why(exc)}") from None
                try:
                    return await self._read(target, response, limit, robots)
                except httpx.HTTPError as exc:
                    raise KernelError(f"fetching {shown} failed while reading the answer: {_why(exc)}") from None
                finally:
                    await response.aclose()
        if isinstance(failure, httpx.ConnectTimeout):
            raise KernelError(f"could not connect to {shown} within {self._connect_timeout:g} s (setting "
                              "web.connect_timeout_seconds)")
        raise KernelError(f"could not connect to {shown}: {_why(failure) if failure else 'no address'}")

    async def _read(self, target: _Target, response: httpx.Response, limit: int, robots: bool) -> _Reply:
        shown = str(target.url)
        status, headers = response.status_code, response.headers
        if status in REDIRECT_STATUSES and "location" in headers:
            return _Reply(status, headers, location=headers["location"])
        if not robots and _kind(_media_type(headers.get("content-type", ""))) is None:
            raise InvalidArgument(f"{shown} serves {_media_type(headers['content-type'])!r}, a binary type; web.fetch "
                                  "returns text only (HTML, text/*, JSON, XML, JavaScript, YAML)")
        declared = headers.get("content-length", "")
        if not robots and declared.isdigit() and int(declared) > limit:
            raise _Refusal(shown, f"{shown} declares {int(declared)} bytes, more than this fetch may read ({limit} "
                                  "bytes; max_bytes, at most the setting web.max_bytes)")
        decoder = _Decoder(_content_coding(shown, headers))
        wire_limit = limit + limit // 8 + _CHUNK  # compressed bytes that decode to nothing are bounded too
        chunks: list[bytes] = []
        got = wire = 0
        async for raw in response.aiter_raw(_CHUNK):  # raw: httpx decodes nothing, the pack does, bounded
            wire += len(raw)
            chunk = decoder.feed(shown, raw, limit - got)
            chunks.append(chunk)
            got += len(chunk)
            if got > limit or wire > wire_limit:
                if robots:
                    body = b"".join(chunks)[:limit]
                    return _Reply(status, headers, body.rsplit(b"\n", 1)[0], truncated=True)
                raise _Refusal(shown, f"{shown} sent more than {limit} bytes, more than this fetch may read "
                                      "(max_bytes, at most the setting web.max_bytes); the page is not returned cut")
        decoder.finish(shown, wire)
        return _Reply(status, headers, b"".join(chunks))

    # ---- robots.txt ---------------------------------------------------------------------------------------

    async def _robots_for(self, target: _Target, caller: str) -> _Robots:
        origin = target.origin
        cache = self._robots
        lock = cache.locks.setdefault(origin, asyncio.Lock())
        async with lock:
            hit = cache.entries.get(origin)
            if hit is not None and hit[0] > time.monotonic():
                cache.entries.move_to_end(origin)
                return hit[1]
            robots = await self._load_robots(target, caller)
            ttl = self._robots_ttl if robots.blanket is not False else min(self._robots_ttl, ROBOTS_FAILURE_TTL)
            if robots.failure:
                ttl = 0
            if ttl > 0:
                cache.entries[origin] = (time.monotonic() + ttl, robots)
                cache.entries.move_to_end(origin)
                while len(cache.entries) > ROBOTS_CACHE_SIZE:
                    old, _ = cache.entries.popitem(last=False)
                    cache.locks.pop(old, None)
            elif origin in cache.entries:
                del cache.entries[origin]
        if len(cache.locks) > 4 * ROBOTS_CACHE_SIZE:
            cache.locks = {k: v for k, v in cache.locks.items() if v.locked() or k in cache.entries}
        return robots

    async def _load_robots(self, target: _Target, caller: str) -> _Robots:
        """robots.txt of `target`'s origin, downloaded; the download (every hop) audited as `web.robots`
        whenever the network was reached, whatever came of it (a timeout included)."""
        where = f"{target.url.scheme}://{target.host_header}/robots.txt"
        trail = _Trail()
        robots: _Robots | None = None
        try:
            robots = await self._download_robots(target, where, trail)
            return robots
        finally:
            if trail.contacted:
                via = f", via {len(trail.hops)} redirect(s): {' -> '.join([where, *trail.hops])}" if trail.hops else ""
                if robots is None:
                    self.context.audit(caller, "web.robots", where, False, f"stopped before an answer{via}")
                elif robots.status == 0:
                    self.context.audit(caller, "web.robots", where, False, _why(Exception(robots.why)) + via)
                else:
                    self.context.audit(caller, "web.robots", where, True, f"status {robots.status}{trail.note}{via}")

    async def _download_robots(self, target: _Target, where: str, trail: _Trail) -> _Robots:
        current, hops = where, 0
        try:
            step = target.url.copy_with(raw_path=b"/robots.txt", fragment=None)
            check = _Target(step, target.host, target.port, target.literal, target.addresses)
            while True:
                reply = await self._get(check, ROBOTS_MAX_BYTES, robots=True, trail=trail)
                if reply.location is None:
                    break
                hops += 1
                if hops > ROBOTS_MAX_REDIRECTS:
                    return _Robots(reply.status, True, f"{where} redirects more than {ROBOTS_MAX_REDIRECTS} times, "
                                                       "so it counts as unavailable (RFC 9309): no rules apply")
                try:
                    current = str(check.url.join(reply.location))
                except (httpx.InvalidURL, ValueError, UnicodeError):
                    return _Robots(0, False, f"{where} redirects to an invalid URL, so it is unreachable (RFC 9309): "
                                             "nothing may be fetched from this origin")
                trail.hops.append(current)
                check = await self._check(current)
        except _Refusal as refusal:
            return _Robots(0, False, f"{where} redirects to a refused URL ({refusal.why}), so it is unreachable "
                                     "(RFC 9309): nothing may be fetched from this origin")
        except KernelError as exc:
            return _Robots(0, False, f"{where} is unreachable ({exc}), so nothing may be fetched from this origin "
                                     "(RFC 9309)", failure=str(exc))
        status = reply.status
        trail.note = f", {len(reply.body)} bytes, sha256 {hashlib.sha256(reply.body).hexdigest()}"
        if 200 <= status < 300:
            text = _decode(reply.body, reply.headers.get("content-type", ""), html=False)
            group, rules = await self._in_pool(parse_robots, text, self._product)
            cut = " (its first 500 KiB)" if reply.truncated else ""
            if len(rules) >= ROBOTS_MAX_RULES:
                cut += f" (the first {ROBOTS_MAX_RULES} rules of the group)"
            if not group:
                return _Robots(status, True, f"{where}{cut} has no group for {self._product!r} or '*': no rules apply")
            return _Robots(status, None, f"{where}{cut}", rules, group)
        if 400 <= status < 500 and status != 429:
            return _Robots(status, True, f"{where} answers {status}, so it is unavailable (RFC 9309): no rules apply")
        return _Robots(status, False, f"{where} answers {status}, so it is unreachable (RFC 9309): nothing may be "
                                      "fetched from this origin")

    async def _robots_of(self, url: Any, caller: str) -> tuple[_Target, _Robots]:
        target = await self._check(url)
        return target, await self._robots_for(target, caller)

    async def _robots_gate(self, target: _Target, caller: str) -> None:
        robots = await self._robots_for(target, caller)
        allowed, why, _ = robots.verdict(target.path)
        if robots.failure:  # the site is down or broken: a failure, not robots.txt's refusal
            raise KernelError(f"the site did not answer: {robots.failure} (its robots.txt is read first, RFC 9309)")
        if not allowed:
            raise _Refusal(str(target.url), f"robots.txt forbids {target.url} to {self._product!r}: {why}")

    # ---- edges --------------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self, caller: str, op: str) -> Iterator[None]:
        """A guard's refusal becomes the audited AccessDenied."""
        try:
            yield
        except _Refusal as refusal:
            raise self.context.denied(caller, op, _shown(refusal.url), refusal.why) from None

    async def _within_timeout(self, what: str, coro: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                return await coro
        except TimeoutError:
            raise KernelError(f"{what} took longer than {self._timeout:g} s (setting web.timeout_seconds); the site "
                              "is slow or the page too large") from None

    def _limit(self, max_bytes: Any) -> int:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InvalidArgument(f"max_bytes must be a whole number of bytes, 0 for the default "
                                  f"({self._max_bytes}), not {max_bytes!r}")
        return max_bytes or self._max_bytes

    # ---- capabilities -------------------------------------------------------------------------------------

    @implements("web.fetch")
    async def fetch(self, caller: str, url: str, format: str = "markdown", max_bytes: int = 0) -> dict:
        """GET a public web page, following redirects, and return its text: the main text of an HTML page as
        markdown or plain text, or the page as served ('raw'); text types as served."""
        op = "web.fetch"
        if format not in FORMATS:
            raise InvalidArgument(f"format must be one of {', '.join(repr(f) for f in FORMATS)}, not {format!r}")
        with self._guard(caller, op):
            limit = self._limit(max_bytes)
            if limit > self._max_bytes:
                raise _Refusal(url, f"max_bytes {limit} is more than this ecosystem allows one fetch "
                                    f"({self._max_bytes} bytes, setting web.max_bytes); ask for less, or 0 for that")
            trail = _Trail()
            try:
                return await self._within_timeout(f"fetching {_shown(url)}", self._fetch(caller, url, format, limit, trail))
            except _Refusal as refusal:
                if trail.hops:
                    refusal.why += f" (reached by a redirect from {trail.hops[-1]})"
                raise
            except KernelError as exc:  # a failure after the pack reached out: part of the egress trail
                if trail.contacted:
                    self.context.audit(caller, op, _shown(url), False, _why(exc))
                raise
            except Exception as exc:  # a bug, but the network was reached: still part of the trail
                if trail.contacted:
                    self.context.audit(caller, op, _shown(url), False, f"{type(exc).__name__}: {_why(exc)}")
                raise

    async def _fetch(self, caller: str, url: str, fmt: str, limit: int, trail: _Trail) -> dict:
        current, hops = url, trail.hops
        while True:
            target = await self._check(current)
            trail.contacted = True  # robots.txt (unless cached) or the page: the network from here on
            await self._robots_gate(target, caller)
            reply = await self._get(target, limit, trail=trail)
            if reply.location is None:
                break
            here = str(target.url)
            hops.append(here)
            try:
                current = str(target.url.join(reply.location).copy_with(fragment=None))
            except (httpx.InvalidURL, ValueError, UnicodeError):
                raise KernelError(f"{here} redirects to {_shown(reply.location)}, which is not a valid URL") from None
            if current in hops:
                raise KernelError(f"redirect loop: {' -> '.join(hops + [current])}")
            if len(hops) > self._max_redirects:
                raise _Refusal(current, f"{url} redirects more than {self._max_redirects} times (setting "
                                        f"web.max_redirects): {' -> '.join(hops + [current])}")
        content_type = reply.headers.get("content-type", "")
        media = _media_type(content_type)
        kind = _kind(media)
        final = str(target.url)
        text = _decode(reply.body, content_type, html=kind == "html")
        if kind == "":
            if b"\x00" in reply.body[:8192] or "\ufffd" in text[:8192]:
                raise InvalidArgument(f"{final} serves no Content-Type and its body is not text; web.fetch returns "
                                      "text only")
            kind = "html" if _looks_like_html(text) else "text"
        title, content = "", text
        if kind == "html":
            title, content = await self._in_pool(_render, text, fmt, final, self._max_extract)
        digest = hashlib.sha256(reply.body).hexdigest()
        via = f", via {len(hops)} redirect(s) from {hops[0]}" if hops else ""
        self.context.audit(caller, "web.fetch", _shown(final), True,
                           f"status {reply.status}, {media or 'no type'}, {len(reply.body)} bytes, sha256 {digest}{via}")
        return {"url": final, "status": reply.status, "content_type": media, "title": title, "content": content,
                "size": len(reply.body), "sha256": digest, "redirects": hops}

    @implements("web.robots")
    async def robots(self, caller: str, url: str) -> dict:
        """Whether robots.txt lets this pack's user agent fetch `url`, and why (the rule that decided)."""
        op = "web.robots"
        with self._guard(caller, op):
            target, robots = await self._within_timeout(f"reading robots.txt for {_shown(url)}", self._robots_of(url, caller))
            allowed, why, rule = robots.verdict(target.path)
            return {"url": str(target.url), "robots_url": f"{target.url.scheme}://{target.host_header}/robots.txt",
                    "user_agent": self._agent, "allowed": allowed, "status": robots.status, "reason": why,
                    "rule": rule}


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
