import time


@tool
async def compare_models(self, prompt: str, models: list[str] = [], max_tokens: int = 128) -> list[dict]:
    """Send one prompt to several model aliases (all of them by default) and compare the answers."""
    aliases = models or [m["alias"] for m in await self.use("models.list")]
    results = []
    for alias in aliases:
        started = time.monotonic()
        try:
            answer = await self.use("models.send", model=alias, prompt=prompt, max_tokens=max_tokens)
        except Exception as exc:  # one failing model must not hide the others' answers
            results.append({"model": alias, "ok": False, "error": str(exc)})
            continue
        results.append({
            "model": alias,
            "ok": True,
            "text": answer["text"],
            "total_tokens": answer["total_tokens"],
            "latency_ms": round((time.monotonic() - started) * 1000),
        })
    return results
