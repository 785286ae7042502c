"""Grace's pages: the templates in templates/ filled in, every value HTML-escaped (quotes included).

A template value named `*_html` is markup this module built from escaped parts and goes in as is; every other
value is escaped by `render`. The pages carry no inline script, style or event handler: the CSP forbids them,
and the stylesheet and script are separate files (`assets.py`). Nothing user-supplied is ever placed in a
URL scheme position: links are built from fixed paths and quoted ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote

from .assets import CSS_PATH, ICON_PATH, JS_PATH

NAV = (("/", "Overview"), ("/chat", "Chat"), ("/conversations", "Conversations"), ("/mads", "MADs"),
       ("/health", "Health"), ("/audit", "Audit log"))
TEMPLATES = {path.stem: Template(path.read_text(encoding="utf-8"))
             for path in Path(__file__).with_name("templates").glob("*.html")}
_ASSETS = {"css": CSS_PATH, "js": JS_PATH, "icon": ICON_PATH}


@dataclass(frozen=True)
class PageContext:
    """What every signed-in page needs: the ecosystem, the client, the CSRF token and the active tab."""

    ecosystem: str
    version: str
    client: str
    csrf: str
    active: str
    pages: frozenset[str] = frozenset(href for href, _ in NAV)
    """The pages this client may open: the others are left out of the navigation."""


def e(value: Any) -> str:
    """The HTML-escaped text of any value."""
    return escape("" if value is None else str(value), quote=True)


def render(template: str, **values: Any) -> str:
    """A template filled in: values named `*_html` as they are (markup built here), every other one escaped."""
    values = {**_ASSETS, **values}
    return TEMPLATES[template].substitute({k: v if k.endswith("_html") else e(v) for k, v in values.items()})


def page(title: str, ecosystem: str, body_html: str) -> str:
    return render("page", title=title, ecosystem=ecosystem, body_html=body_html)


def badge(text: str, tone: str = "") -> str:
    return f'<span class="badge {e(tone)}">{e(text)}</span>'


def state_badge(ok: bool, text: str) -> str:
    return badge(text, "ok" if ok else "bad")


def layout(ctx: PageContext, title: str, body_html: str) -> str:
    links = "".join(
        f'<a href="{href}"{" class=active" if href == ctx.active else ""}>{e(label)}</a>' for href, label in NAV
        if href in ctx.pages
    )
    return page(title, ctx.ecosystem, render("signed_in", ecosystem=ctx.ecosystem, version=ctx.version, title=title,
                                             client=ctx.client, csrf=ctx.csrf, links_html=links, body_html=body_html))


def alert(kind: str, text: str) -> str:
    return f'<div class="alert {e(kind)}" role="alert">{e(text)}</div>'


def signin_page(ecosystem: str, csrf: str, next_path: str, error: str = "", info: str = "") -> str:
    notice = (alert("error", error) if error else "") + (alert("info", info) if info else "")
    return page("Sign in", ecosystem, render("signin", ecosystem=ecosystem, csrf=csrf, next=next_path, notice_html=notice))


def error_page(ecosystem: str, status: int, title: str, message: str) -> str:
    return page(title, ecosystem, render("error", title=title, message=message, status=int(status)))


# ---- values --------------------------------------------------------------------------------------

_NONE = '<span class="muted">none</span>'

def value_html(value: Any) -> str:
    """Any JSON-like value as escaped HTML: booleans as badges, dicts as key/value lists."""
    if isinstance(value, dict | list | tuple) and not value:
        return _NONE
    if isinstance(value, dict):
        return f'<dl class="kv">{"".join(f"<dt>{e(k)}</dt><dd>{value_html(v)}</dd>" for k, v in value.items())}</dl>'
    if isinstance(value, list | tuple):
        if any(isinstance(v, dict | list | tuple) for v in value):
            return "".join(f"<div>{value_html(v)}</div>" for v in value)
        return ", ".join(e(v) for v in value)
    return e(value) if isinstance(value, str) and value else _scalar_html(value)  # text as it is, not as a time


def short_time(ts: str) -> str:
    """'2024-05-01T10:11:12.123456Z' -> '2024-05-01 10:11:12' (the full value stays in the title)."""
    return f'<span class="nowrap" title="{e(ts)}">{e(str(ts)[:19].replace("T", " "))}</span>'


def stack_table(heads: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table whose rows become labelled blocks on a narrow screen (the `data-label` of each cell).

    `heads` are plain text (escaped here); the cells are HTML already escaped by the caller. Long
    names may wrap after an underscore."""
    head = "".join(f'<th scope="col">{e(h).replace("_", "_<wbr>")}</th>' for h in heads)
    labels = [e(h).replace("_", "_\u200b") for h in heads]
    body = "".join(
        "<tr>" + "".join(f'<td data-label="{label}">' + (f"<div>{cell}</div>" if cell else "") + "</td>"
                         for label, cell in zip(labels, row, strict=True)) + "</tr>"
        for row in rows
    )
    return f'<table class="{e(" ".join(["stack", cls]).strip())}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ---- tool results and stored replies -------------------------------------------------------------
# A tool's answer is shown as what it is: a list of objects as a table (a column per key), an object
# as a field list, with the raw JSON behind a <details> toggle (no script needed). Stored replies are
# decoded first (Grace's are JSON text, a MAD's keep the result in the payload), so a value reaches
# the page escaped exactly once: never JSON-quoted inside JSON, never HTML-escaped twice.

_ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?")
_MAX_DEPTH = 3  # tables and field lists nest this deep inside a result; deeper values are compact JSON
_OPEN_FIELDS = 4  # an object in a table cell with more fields than this is folded


def stored_value(message: dict[str, Any]) -> tuple[bool, Any]:
    """What a bus message carries: (True, the value) for a tool's structured answer, else (False, its text)."""
    payload = message.get("payload")
    payload = payload if isinstance(payload, dict) else {}
    content = message.get("content")
    text = "" if content is None else str(content)
    if payload.get("format") == "json":  # Grace's record of a command's answer: JSON text
        try:
            return True, json.loads(text)
        except ValueError:  # cut when stored: only the text is left
            return False, text
    if message.get("kind") == "reply" and "result" in payload and not isinstance(payload["result"], str):
        return True, payload["result"]  # a MAD's answer over the bus: the content is its JSON
    return False, text


def _is_message(row: dict[str, Any]) -> bool:
    return all(k in row for k in ("sender", "kind", "content"))


def _scalar_html(value: Any) -> str:
    if isinstance(value, bool):
        return state_badge(value, "yes" if value else "no")
    if value is None or value == "":
        return '<span class="muted">—</span>'
    if isinstance(value, str) and _ISO_TIME.fullmatch(value):
        return short_time(value)
    if isinstance(value, str) and len(value) >= 20 and not any(c.isspace() for c in value):  # an id, a URL:
        return f'<span class="long">{e(value)}</span>'  # it may break anywhere
    return e(value)


def inline_html(value: Any, depth: int = 0) -> str:
    """A value inside a table cell, compact: an object as `key value` lines, a list of plain values
    comma-separated, a list of objects folded (`N items`), anything deeper as compact JSON."""
    if not isinstance(value, dict | list | tuple):
        return _scalar_html(value)
    if not value:
        return _NONE
    if depth >= _MAX_DEPTH:
        return f'<code class="json">{e(json.dumps(value, ensure_ascii=False, default=str))}</code>'
    if isinstance(value, dict):
        pairs = "".join(f'<div class="pair"><span class="key">{e(k)}</span> {inline_html(v, depth + 1)}</div>'
                        for k, v in value.items())
        if len(value) <= _OPEN_FIELDS:
            return pairs
        return f'<details class="nested"><summary>{len(value)} fields</summary>{pairs}</details>'
    if all(not isinstance(v, dict | list | tuple) for v in value):
        return ", ".join(_scalar_html(v) for v in value)
    items = "".join(f"<li>{inline_html(v, depth + 1)}</li>" for v in value)
    count = f"{len(value)} {'item' if len(value) == 1 else 'items'}"
    return f'<details class="nested"><summary>{count}</summary><ul class="items">{items}</ul></details>'


def _is_records(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, dict) for v in value)


def fields_html(obj: dict[str, Any], depth: int = 0) -> str:
    """An object as a definition list: a field per key; a nested object as fields, a list of objects
    as a table under its name (the full width)."""
    rows = []
    for k, v in obj.items():
        if depth < _MAX_DEPTH and _is_records(v):
            rows.append(f'<dt class="wide">{e(k)}</dt><dd class="wide">{records_html(list(v), depth + 1)}</dd>')
        elif depth < _MAX_DEPTH and isinstance(v, dict) and v:
            rows.append(f"<dt>{e(k)}</dt><dd>{fields_html(v, depth + 1)}</dd>")
        else:
            rows.append(f"<dt>{e(k)}</dt><dd>{inline_html(v, depth)}</dd>")
    return f'<dl class="kv fields">{"".join(rows)}</dl>'


def _record_cell(row: dict[str, Any], key: str, depth: int) -> str:
    if key not in row:
        return ""
    value = row[key]
    if _is_message(row):  # a bus message (history, search): who it was for, and what it carries, decoded
        if key == "sender":
            return sender_html(row)
        if key == "content":
            structured, content = stored_value(row)
            return inline_html(content, depth) if structured else f'<span class="text">{e(content)}</span>'
        if key == "payload" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "result"}  # a reply's result is its content, shown there
    if isinstance(value, str) and len(value) >= 16 and key.endswith("id") and " " not in value:
        return f'<code class="id">{e(value)}</code>'
    return inline_html(value, depth)


def records_html(rows: list[dict[str, Any]], depth: int = 0) -> str:
    """A list of objects as a table: a column per key, in the order the keys first appear."""
    columns: list[str] = []
    for row in rows:
        columns += [str(k) for k in row if str(k) not in columns]
    cells = [[_record_cell(row, c, depth) for c in columns] for row in rows]
    return f'<div class="scroll">{stack_table(columns, cells, "records")}</div>'


def result_html(value: Any) -> str:
    """A tool's structured answer: a table, fields or text, and the raw JSON behind a toggle."""
    if _is_records(value):
        count = f'<p class="muted small">{len(value)} {"row" if len(value) == 1 else "rows"}</p>'
        shown = records_html(value) + count
    elif isinstance(value, dict) and value:
        shown = fields_html(value)
    elif isinstance(value, list | dict) and not value:
        shown = '<p class="muted">No results: the answer is empty.</p>'
    else:
        shown = f'<div class="text">{inline_html(value)}</div>'
    return (f'<div class="result">{shown}<details class="raw"><summary>Raw JSON</summary>'
            f"<pre>{e(json_text(value))}</pre></details></div>")


def message_body_html(message: dict[str, Any], text: str | None = None, pre: bool = False) -> tuple[bool, str]:
    """(structured?, the body of a message): a tool's answer as `result_html`, else its text, escaped
    (`pre`: in a monospace block). `text` replaces the stored content (the full answer shown once)."""
    shown = message if text is None else {**message, "content": text}
    structured, value = stored_value(shown)
    if structured:
        return True, result_html(value)
    payload = message.get("payload")
    if isinstance(payload, dict) and payload.get("format") == "json":  # JSON that was cut when stored
        return False, f'<pre>{e(value)}</pre><p class="muted small">The stored answer was cut; the raw text is shown.</p>'
    return False, f"<pre>{e(value)}</pre>" if pre else f'<div class="text">{e(value)}</div>'


# ---- pages ---------------------------------------------------------------------------------------

def _conv_link(conv: dict[str, Any]) -> str:
    return f'<a href="/conversations/{quote(str(conv["id"]), safe="")}">{e(conv["title"])}</a>'


def conversations_table(convs: list[dict[str, Any]]) -> str:
    if not convs:
        return '<p class="muted">No conversations yet.</p>'
    rows = [
        [_conv_link(c), e(", ".join(c.get("participants", []))), str(int(c.get("message_count", 0))),
         f'<span class="muted">{short_time(c.get("created_at", ""))}</span>']
        for c in convs
    ]
    return stack_table(["Title", "Participants", "Messages", "Created"], rows)


def _running(mad: dict[str, Any]) -> str:
    return state_badge(mad.get("state") in ("running", "idle"), str(mad.get("state", "unknown")))


def overview_page(ctx: PageContext, status: dict[str, Any], mads: list[dict[str, Any]],
                  convs: list[dict[str, Any]]) -> str:
    rows = [[f"<strong>{e(m['name'])}</strong>", e(m.get("role", "")), e(m.get("level", "")), _running(m),
             str(len(m.get("tools", [])))] for m in mads]
    recent = (f"<section><h2>Recent conversations</h2>{conversations_table(convs)}</section>"
              if "/conversations" in ctx.pages else "")
    body = render(
        "overview", state_html=state_badge(status.get("status") == "ok", str(status.get("status", "unknown"))),
        description=status.get("description", ""), healthy=sum(1 for m in status.get("mads", []) if m.get("ok")),
        mad_count=len(status.get("mads", [])), search=status.get("search", ""),
        database_html=state_badge(status.get("database") == "ok", f"database {status.get('database', '')}"),
        started_html=short_time(status.get("started_at", "")), recent_html=recent,
        mads_html=stack_table(["Name", "Role", "Level", "State", "Tools"], rows))
    return layout(ctx, "Overview", body)


@dataclass(frozen=True)
class ToolInfo:
    """One tool as the chat offers it: `/<qualified> name=value ...`."""

    qualified: str
    signature: str
    description: str

    @property
    def summary(self) -> str:
        return self.description.splitlines()[0] if self.description else ""


def _message(env: dict[str, Any], mine: str, shown: dict[str, str]) -> str:
    kind = str(env.get("kind", "message"))
    payload = env.get("payload") or {}
    text = shown.get(str(env.get("id")), str(env.get("content", "")))
    if kind == "request" and env.get("sender") == "grace":
        return f'<div class="hop">grace → {e(payload.get("to", ""))} · {short_time(env.get("created_at", ""))}</div>'
    on_behalf = str(payload.get("on_behalf_of") or "")
    is_mine = mine in (env.get("sender"), on_behalf)
    if payload.get("tool"):
        who = f"<strong>{e(payload['tool'])}</strong>"
    elif on_behalf:  # posted for a client by a MAD (an MCP client's rogers.post): the client, via the MAD
        who = f'<strong>{"You" if is_mine else e(on_behalf)}</strong> via {e(env.get("sender", ""))}'
    else:
        who = f'<strong>{"You" if is_mine else e(env.get("sender", ""))}</strong>'
    structured, body = message_body_html(env, text)
    classes = ("msg" + (" mine" if is_mine else "") + (" error" if kind == "error" else "")
               + (" result" if structured else ""))
    kind_badge = "" if kind == "message" else f' {badge(kind, "kind-" + kind)} ·'
    return (f'<div class="{classes}"><div class="meta">{who} ·{kind_badge} '
            f"{short_time(env.get('created_at', ''))}</div>{body}</div>")


def chat_page(ctx: PageContext, history: list[dict[str, Any]], shown: dict[str, str], tools: list[ToolInfo],
              hidden_tools: int, notice: str) -> str:
    mine = f"client:{ctx.client}"
    messages = "".join(_message(env, mine, shown) for env in history) or (
        '<p class="muted">No messages yet. Ask something in prose, or run a command such as <code>/help</code>.</p>')
    tool_items = "".join(
        f'<li><button type="button" class="insert" data-command="/{e(t.qualified)}">/{e(t.signature)}</button>'
        f'<div class="muted">{e(t.summary)}</div></li>' for t in tools
    ) or '<li class="muted">Your token allows no tools.</li>'
    more = f'<p class="hint">{hidden_tools} more tools are not allowed for your token.</p>' if hidden_tools else ""
    body = render("chat", csrf=ctx.csrf, notice_html=alert("error", notice) if notice else "",
                  messages_html=messages, tools_html=tool_items, more_html=more)
    return layout(ctx, "Chat", body)


def tools_text(tools: list[ToolInfo]) -> str:
    """The plain-text answer to /help."""
    lines = [f"  /{t.signature}  {t.summary}".rstrip() for t in tools] or ["  (none)"]
    return "\n".join(["Commands your token allows (arguments are name=value):", *lines])


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def conversations_page(ctx: PageContext, convs: list[dict[str, Any]]) -> str:
    body = ('<p class="lead">Every conversation on the bus, most recently active first.</p>'
            f"<section>{conversations_table(convs)}</section>")
    return layout(ctx, "Conversations", body)


def sender_html(message: dict[str, Any]) -> str:
    """Who said it: the client a MAD posted for (an MCP client's rogers.post), then the MAD; else the sender."""
    payload = message.get("payload")
    on_behalf = payload.get("on_behalf_of") if isinstance(payload, dict) else None
    sender = e(message.get("sender", ""))
    return f'{e(on_behalf)} <span class="muted small">via {sender}</span>' if on_behalf else sender


def conversation_page(ctx: PageContext, conv: dict[str, Any], history: list[dict[str, Any]]) -> str:
    rows = [
        [f'<span class="muted">{short_time(m.get("created_at", ""))}</span>', sender_html(m),
         badge(str(m.get("kind", "")), "kind-" + str(m.get("kind", ""))), message_body_html(m, pre=True)[1]]
        for m in history
    ]
    table = (f'<div class="scroll">{stack_table(["Time", "Sender", "Kind", "Content"], rows, "messages")}</div>' if rows
             else '<p class="muted">No messages in this conversation yet.</p>')
    body = render("conversation", title=conv.get("title", ""), id=conv.get("id", ""),
                  created_by=conv.get("created_by", ""), created_html=short_time(conv.get("created_at", "")),
                  participants_html=value_html(conv.get("participants", [])), table_html=table)
    return layout(ctx, "Conversation", body)


def _tool_row(tool: dict[str, Any], allowed: set[str]) -> list[str]:
    params = ", ".join(
        f"{p['name']}: {p.get('type') or 'any'}" + ("" if p.get("required") else f" = {p.get('default')!r}")
        for p in tool.get("params", [])
    )
    mark = badge("allowed", "ok") if tool["qualified_name"] in allowed else badge("not allowed")
    return [f"<code>{e(tool['qualified_name'])}({e(params)})</code>", e(tool.get("description", "")), mark]


def mads_page(ctx: PageContext, mads: list[dict[str, Any]], tools: dict[str, list[dict[str, Any]]],
              allowed: set[str]) -> str:
    sections = []
    for m in mads:
        items = [_tool_row(t, allowed) for t in tools.get(m["name"], [])]
        is_role = m.get("max_instances") is not None  # lifecycle ephemeral: instances spawned per task
        tool_table = (stack_table(["Tool", "Description", "Your token"], items) if items
                      else '<p class="muted">A role: MADs spawn an instance of it per task; its tools are not served.</p>'
                      if is_role else '<p class="muted">No tools.</p>')
        facts = {
            "role": m.get("role", ""), "level": m.get("level", ""), "lifecycle": m.get("lifecycle", ""),
            "talks to": m.get("talks_to", []), "conversations": m.get("conversations", []), "owns": m.get("owns", []),
            "token budget": m.get("budget_tokens", ""),
        }
        if m.get("spawns"):
            facts["spawns"] = m["spawns"]
        if is_role:
            facts["instances"] = f"{m.get('instances', 0)} running (at most {m['max_instances']} at once)"
        sections.append(render("mad", name=m["name"], state_html=_running(m), facts_html=value_html(facts),
                               tools_html=tool_table))
    body = '<p class="lead">Each MAD: its role, level, state and the tools of its Action Engine.</p>' + "".join(sections)
    return layout(ctx, "MADs", body)


_TOP_FIELDS = ("status", "version", "database", "search", "started_at", "uptime_s")


def health_page(ctx: PageContext, status: dict[str, Any]) -> str:
    top = {k: status[k] for k in _TOP_FIELDS if k in status}
    extra = {k: v for k, v in status.items() if k not in (*_TOP_FIELDS, "mads", "name", "description", "healthy")}
    cards = "".join(
        f'<section><h2>{e(m.get("name", ""))} {state_badge(bool(m.get("ok")), "healthy" if m.get("ok") else "unhealthy")}'
        f'</h2>{value_html({k: v for k, v in m.items() if k not in ("name", "ok")})}</section>'
        for m in status.get("mads", [])
    )
    body = render("health", state_html=state_badge(status.get("status") == "ok", str(status.get("status", "unknown"))),
                  facts_html=value_html({**top, **extra}), mads_html=cards)
    return layout(ctx, "Health", body)


def audit_page(ctx: PageContext, entries: list[dict[str, Any]]) -> str:
    rows = [
        [f'<span class="muted">{e(a.get("id", ""))}</span>', f'<span class="muted">{short_time(a.get("ts", ""))}</span>',
         e(a.get("actor", "")), f'<code>{e(a.get("action", ""))}</code>', e(a.get("subject", "")),
         state_badge(bool(a.get("ok")), "ok" if a.get("ok") else "refused"), e(a.get("detail", "")),
         e(a.get("on_behalf_of", "")), f'<span class="muted">{e(a["remote"])}</span>' if a.get("remote") else ""]
        for a in entries
    ]
    # Columns sized in the stylesheet (table.audit): long subjects, details and addresses wrap.
    heads = ["#", "Time", "Actor", "Action", "Subject", "Outcome", "Detail", "On behalf of", "Remote"]
    table = (f'<div class="scroll">{stack_table(heads, rows, "audit")}</div>' if rows
             else '<p class="muted">The audit log is empty.</p>')
    body = ('<p class="lead">The newest entries of the hash-chained audit log; '
            "<code>python -m &lt;ecosystem&gt; audit verify</code> checks the whole chain.</p>"
            f"<section>{table}</section>")
    return layout(ctx, "Audit log", body)
