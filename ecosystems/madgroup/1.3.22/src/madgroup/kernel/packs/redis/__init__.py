"""The redis pack (the Redis Streams bus)'s catalogue: what it is for, its pinned dependencies.

Light on purpose (pydantic and the core's catalogue types only): the compiler and `capabilities.py` read it;
the implementation, with its libraries, is `pack.py`, imported only when the pack is loaded.
"""

from __future__ import annotations

from ...capabilities import PackInfo

PACK = PackInfo("redis", "The Redis Streams bus: several processes, on one host or several, serve the ecosystem's "
                         "MADs over one Redis (`serve --bus redis://...`), with failover and `bus status|forget`",
                dependencies=("redis==8.1.0",), kind="deployment")
