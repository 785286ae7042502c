"""The console pack (Grace's web console)'s catalogue: what it is for.

Why a pack: an ecosystem used only by agents over MCP needs no browser UI with sign-in, sessions and a chat,
and least privilege says it should have no web surface it did not ask for. The core keeps Grace the MAD (her
spec tools bound to `ecosystem.status` and `ecosystem.mads`), the MCP gateway, /healthz, /metrics and the
security headers on every response; this pack is her web UI (`pack.py`, `pages.py`, `assets.py`, `templates/`,
`static/`), which an artifact carries only when its spec names it (`packs: {console: {}}` in ecosystem.yaml).
Without it `GET /` says how to add it.

Light on purpose (the core's catalogue types only): the compiler and `capabilities.py` read it; the
implementation is `pack.py`, imported only when the gateway mounts the console.
"""

from __future__ import annotations

from ...capabilities import PackInfo

PACK = PackInfo("console", "Grace's web console at /: sign-in with a client token, a chat with the Imperator and "
                           "the tools, and pages of conversations, MADs, health and the audit log",
                kind="deployment")
