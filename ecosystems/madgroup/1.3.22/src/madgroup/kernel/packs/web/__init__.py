"""The web pack's catalogue: what it is for, its pinned dependencies,
its capabilities, the shapes of their results and their MCP hints.

Light on purpose (pydantic and the core's catalogue types only): the compiler and `capabilities.py` read it;
the implementation, with its libraries, is `pack.py`, imported only when the pack is loaded.
"""

from __future__ import annotations

from ...capabilities import Capability, PackInfo, Shape
from ...capabilities import param as _p

PACK = PackInfo("web", "Guarded GETs of public web pages as markdown or text: http(s) only, every resolved address "
                       "checked public (no loopback, private, link-local or metadata addresses) and connected to as "
                       "checked, redirects re-checked, robots.txt obeyed, size and time limits",
                dependencies=("trafilatura==2.3.1", "lxml==6.2.0"))


class WebPage(Shape):
    """A fetched web page: the final URL (after redirects), its HTTP status and media type, its title (HTML only,
    else ""), its content as text (markdown, plain text or as served), the body's size in bytes and SHA-256, and
    the URLs that redirected to it, in order (the one asked for first; empty when none did)."""

    url: str
    status: int
    content_type: str
    title: str
    content: str
    size: int
    sha256: str
    redirects: list[str]


class RobotsVerdict(Shape):
    """Whether robots.txt lets the web pack's user agent fetch a URL: the robots.txt consulted and its HTTP status
    (0 when unreachable), the verdict, why, and the rule that decided ("" when none did)."""

    url: str
    robots_url: str
    user_agent: str
    allowed: bool
    status: int
    reason: str
    rule: str


CAPABILITIES: tuple[Capability, ...] = (
    Capability("web.fetch", "Fetch a public web page (http or https; redirects followed and checked; robots.txt "
                            "obeyed) and return its text: format 'markdown' or 'text' (the main text of an HTML "
                            "page) or 'raw' (as served); max_bytes 0 means the ecosystem's limit. Returns {url, "
                            "status, content_type, title, content, size, sha256, redirects}.",
               (_p("url", "str"), _p("format", "str", "markdown"), _p("max_bytes", "int", 0)), "dict",
               shape=WebPage, pack="web"),
    Capability("web.robots", "Whether robots.txt lets this ecosystem's web user agent fetch a URL, and the rule "
                             "that decided; returns {url, robots_url, user_agent, allowed, status, reason, rule}.",
               (_p("url", "str"),), "dict", shape=RobotsVerdict, pack="web"),
)

READ_ONLY: frozenset[str] = frozenset({"web.fetch", "web.robots"})
OPEN_WORLD: frozenset[str] = frozenset({"web.fetch", "web.robots"})
