"""Chat completions from an OpenAI-compatible endpoint, for the model aliases with `provider: openai`.

`complete` POSTs `{api_base}/chat/completions` (httpx) with the prompt, and `Authorization: Bearer <key>` when
the alias names a key (the kernel reads it from the secrets store, as the Turing secret named by the alias's
`api_key_secret`, and audits the use). Every failure is a ModelError that names the alias, never the key or
the body of the answer. The kernel's ModelGateway (models.py) checks budgets before, and charges after.
"""

from __future__ import annotations

from typing import Any

try:  # httpx when the ecosystem pins it; else httpx2, which mcp 2.x always brings (same API)
    import httpx
except ImportError:  # pragma: no cover
    import httpx2 as httpx  # type: ignore[no-redef]

from ...config import ModelAlias
from ...errors import ModelError
from ...models import count_tokens


async def complete(alias_name: str, alias: ModelAlias, prompt: str, max_tokens: int, system: str, *,
                   api_key: str, prompt_tokens: int, transport: Any = None) -> tuple[str, dict[str, int]]:
    """The answer's text and its usage ({prompt_tokens, completion_tokens}: the endpoint's count, else ours)."""
    if not alias.api_base:
        raise ModelError(f"model alias {alias_name!r} has no api_base")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body = {"model": alias.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    try:
        async with httpx.AsyncClient(timeout=alias.timeout_s, transport=transport) as client:
            resp = await client.post(alias.api_base.rstrip("/") + "/chat/completions", json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise ModelError(f"model alias {alias_name!r}: request failed ({type(exc).__name__})") from None
    if resp.status_code != 200:
        raise ModelError(f"model alias {alias_name!r}: HTTP {resp.status_code}")
    try:
        data = resp.json()
        text = data["choices"][0]["message"]["content"] or ""
        usage = data.get("usage") or {}
        return text, {"prompt_tokens": int(usage.get("prompt_tokens", prompt_tokens)),
                      "completion_tokens": int(usage.get("completion_tokens", count_tokens(text)))}
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelError(f"model alias {alias_name!r}: malformed answer") from exc
