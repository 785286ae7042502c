"""The openai pack's catalogue: what it is for. Its library, httpx, is one the core already pins.

A spec does not name it: a build has it when one of its model aliases has `provider: openai`. An ecosystem
whose aliases all use the offline echo model carries no code that sends a prompt over the network.
"""

from __future__ import annotations

from ...capabilities import PackInfo

PACK = PackInfo("openai", "Model aliases with `provider: openai`: chat completions from any OpenAI-compatible "
                          "endpoint, with the key read from the secrets store", kind="provider")
