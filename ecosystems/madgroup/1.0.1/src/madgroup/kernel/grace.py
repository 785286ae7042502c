"""Grace's web page: the ecosystem at a glance. Every dynamic string is HTML-escaped."""

from __future__ import annotations

from html import escape
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:1rem 2rem}header h1{margin:0;font-size:1.5rem}
header p{margin:.25rem 0 0;color:#c8cdd8}main{padding:1rem 2rem;max-width:72rem}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:1rem 1.25rem;margin:1rem 0}
h2{font-size:1.1rem;margin:0 0 .75rem}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.4rem .5rem;border-bottom:1px solid #eef0f4;vertical-align:top;font-size:.92rem}
th{color:#5a6272;font-weight:600}.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}
code{background:#f0f2f5;padding:0 .25rem;border-radius:3px;font-size:.85rem}.muted{color:#6b7280}
"""


def _state(ok: bool, text: str) -> str:
    return f'<span class="{"ok" if ok else "bad"}">{escape(text)}</span>'


def render_index(status: dict[str, Any], mads: list[dict[str, Any]], tools: dict[str, list[dict[str, Any]]],
                 conversations: list[dict[str, Any]]) -> str:
    name = escape(status.get("name", ""))
    desc = escape(status.get("description", ""))
    health = {m["name"]: m for m in status.get("mads", [])}
    rows = []
    for mad in mads:
        h = health.get(mad["name"], {})
        tool_list = " ".join(
            f'<code title="{escape(t.get("description", ""))}">{escape(t["name"])}</code>' for t in tools.get(mad["name"], [])
        ) or '<span class="muted">none</span>'
        rows.append(
            "<tr>"
            f"<td><strong>{escape(mad['name'])}</strong></td>"
            f"<td>{escape(mad.get('role', ''))}</td>"
            f"<td>{escape(mad.get('level', ''))}</td>"
            f"<td>{_state(bool(h.get('ok')), h.get('state', 'unknown'))}</td>"
            f"<td>{tool_list}</td>"
            "</tr>"
        )
    conv_rows = []
    for conv in conversations:
        conv_rows.append(
            "<tr>"
            f"<td>{escape(conv['title'])}</td>"
            f"<td>{escape(', '.join(conv.get('participants', [])))}</td>"
            f"<td>{int(conv.get('message_count', 0))}</td>"
            f"<td class=\"muted\">{escape(conv.get('created_at', ''))}</td>"
            "</tr>"
        )
    conv_html = (
        "<table><thead><tr><th>Title</th><th>Participants</th><th>Messages</th><th>Created</th></tr></thead><tbody>"
        + "".join(conv_rows) + "</tbody></table>"
        if conv_rows else '<p class="muted">No conversations yet.</p>'
    )
    overall = status.get("status") == "ok"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{name} - Grace</title><style>{_CSS}</style></head>
<body><header><h1>{name}</h1><p>{desc}</p></header><main>
<section><h2>Health</h2><p>Ecosystem: {_state(overall, status.get('status', 'unknown'))}
 &middot; database {escape(str(status.get('database', '')))} &middot; search {escape(str(status.get('search', '')))}
 &middot; up since <span class="muted">{escape(str(status.get('started_at', '')))}</span></p>
<p class="muted">MCP clients connect to <code>/mcp</code> with a bearer token; probes use <code>/healthz</code>.</p></section>
<section><h2>MADs</h2><table><thead><tr><th>Name</th><th>Role</th><th>Level</th><th>State</th><th>Tools</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table></section>
<section><h2>Recent conversations</h2>{conv_html}</section>
</main></body></html>
"""
