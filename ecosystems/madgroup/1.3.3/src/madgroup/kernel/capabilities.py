"""The catalogue of kernel capabilities a spec'd tool may be bound to (`builtin: <name>`).

This table is the contract between three parties: the spec loader (a tool bound to a
capability must declare compatible parameters), the offline reference synthesiser (it
renders a tool body that calls the capability), and the kernel runtime (which must
implement every entry with exactly this signature; a kernel test enforces it).

Each capability also names the shape of what it returns (a `Shape` below): MCP clients are told it
as the `outputSchema` of every tool bound to the capability (see kernel/gateway.py).

It imports nothing heavy on purpose (pydantic only, which the spec loader uses anyway): `regen check`
loads it to validate specs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_serializer

# The type vocabulary shared by specs, capabilities and generated code (Python spelling).
TYPE_NAMES: frozenset[str] = frozenset(
    {"str", "int", "float", "bool", "dict", "list", "list[str]", "list[int]", "list[dict]", "None"}
)


@dataclass(frozen=True)
class CapabilityParam:
    name: str
    type: str
    default: object = None
    required: bool = True


@dataclass(frozen=True)
class Capability:
    name: str
    summary: str
    params: tuple[CapabilityParam, ...] = field(default_factory=tuple)
    returns: str = "dict"
    shape: type[Shape] | None = None  # the result's shape; of each item when `returns` is a list
    pack: str = ""  # the capability pack that implements it (kernel/packs/<pack>.py); "" for the core

    def param(self, name: str) -> CapabilityParam | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def output(self) -> Any:
        """The type of the result, as a tool bound to this capability returns it (None: unknown)."""
        if self.shape is None:
            return None
        return list[self.shape] if self.returns.startswith("list") else self.shape


def _p(name: str, type_: str, default: object = ..., /) -> CapabilityParam:
    if default is ...:
        return CapabilityParam(name, type_)
    return CapabilityParam(name, type_, default=default, required=False)


# ---- what capabilities return -------------------------------------------------------------------


class Shape(BaseModel):
    """The shape of a capability's result, as MCP clients are told it (a tool's outputSchema).

    The fields named are always there; a field with a default may be absent (and then stays absent,
    never null); the kernel may add fields it does not name here, and clients get them too
    (`additionalProperties`). The gateway checks every result against its shape before sending it.
    """

    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="wrap")
    def _absent_stays_absent(self, handler: Any) -> Any:
        data = handler(self)
        for name, info in type(self).model_fields.items():
            if not info.is_required() and name not in self.model_fields_set:
                data.pop(name, None)
        return data


class Conversation(Shape):
    """A conversation on the bus."""

    id: str
    title: str
    participants: list[str]
    created_by: str
    created_at: str


class ConversationListing(Conversation):
    """A conversation as listed, with how many messages it holds."""

    message_count: int


class Message(Shape):
    """A message envelope on the bus."""

    id: str
    correlation_id: str
    sender: str
    conversation_id: str
    kind: str
    content: str
    payload: dict[str, Any]
    created_at: str


class ModelAliasInfo(Shape):
    """A model alias this ecosystem can call (never its key)."""

    alias: str
    provider: str
    model: str
    api_base: str
    has_key: bool


class ModelReply(Shape):
    """A model's answer and the tokens it cost, charged to each of `charged_to`."""

    model: str
    provider: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    charged_to: list[str]


class Budget(Shape):
    """One account's token budget."""

    budget: int
    spent: int
    remaining: int
    calls: int


class Budgets(Shape):
    """Token budgets by account: each MAD's, each client's, and what a new client gets."""

    mads: dict[str, Budget]
    clients: dict[str, Budget]
    client_budget_tokens: int


class SecretVersion(Shape):
    """A secret's name and the version written (never its value)."""

    name: str
    version: int


class SecretValue(SecretVersion):
    """A secret's newest version and its value."""

    value: str


class SecretListing(SecretVersion):
    """A stored secret: its newest version and when it was written (never its value)."""

    updated_at: str


class KeyRotation(Shape):
    """What a key rotation re-encrypted (counts, never key material); `key_file` when the operator must install it."""

    secrets: int
    versions: int
    key_id: str
    key_file: str | None = None


class SecretsAuditEntry(Shape):
    """One entry of the secrets audit log."""

    id: int
    ts: str
    actor: str
    on_behalf_of: str
    action: str
    name: str
    ok: bool
    detail: str


class MadHealth(Shape):
    """One MAD's supervision state; `health` is its own report when it could be probed."""

    name: str
    state: str
    ok: bool
    breaker: str
    failures: int
    failures_total: int
    restarts: int
    in_flight: int
    leaked: int
    last_error: str
    last_error_at: str
    retry_in_s: float | None = None
    restart_in_s: float | None = None
    error: str | None = None
    health: dict[str, Any] | None = None


class EcosystemStatus(Shape):
    """Health of the ecosystem and of each MAD."""

    name: str
    description: str
    version: str
    status: str
    healthy: bool
    started_at: str
    uptime_s: float
    database: str
    search: str
    bus: str
    mads: list[MadHealth]


class MadInfo(Shape):
    """A MAD: its role, level, lifecycle, state, conversations, peers, capability families, budget and tools."""

    name: str
    role: str
    level: str
    lifecycle: str
    state: str
    conversations: list[str]
    talks_to: list[str]
    owns: list[str]
    budget_tokens: int
    tools: list[str]
    spawns: list[str] = []  # the roles it may spawn
    max_instances: int | None = None  # a role's (lifecycle "ephemeral") cap, and how many instances run now
    instances: int | None = None


class FileWritten(Shape):
    """A file as written: its path inside the ecosystem's file root, its size and its content's SHA-256."""

    path: str
    size: int
    sha256: str


class FileContent(FileWritten):
    """A file's content (UTF-8 text, or base64 when asked for) with its size and SHA-256."""

    content: str


class FileInfo(Shape):
    """An entry of the file root: its kind ("file", "dir"; "link" or "other" for what the pack shows but never
    follows or opens), its size and when it last changed; a file's SHA-256 from `files.stat`."""

    path: str
    kind: str
    size: int
    modified_at: str
    sha256: str | None = None


class FileDeleted(Shape):
    """What was deleted."""

    path: str
    deleted: bool


class DataColumn(Shape):
    """A column of a lake table or of a query's result: its name and its DuckDB type (e.g. BIGINT, VARCHAR, DATE)."""

    name: str
    type: str


class DataTable(Shape):
    """A table of the ecosystem's data lake: its name, how many rows it holds and its columns, in order."""

    table: str
    rows: int
    columns: list[DataColumn]


class DataIngested(DataTable):
    """A table as an ingest left it (`rows` in all), with how many rows this ingest loaded and in which mode."""

    ingested: int
    mode: str


class DataQueryResult(Shape):
    """What a read-only query returned: its columns, at most `limit` rows (each a list of JSON values, in column
    order), how many rows that is, and whether the query had more rows than were returned."""

    columns: list[DataColumn]
    rows: list[list[Any]]
    row_count: int
    truncated: bool


class DataTableDropped(Shape):
    """The lake table that was dropped."""

    table: str
    dropped: bool


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


class SecurityFinding(Shape):
    """A security finding: its kind ("denial-spike", "signin-burst", "new-action", "secret-read", "audit-chain",
    "report"), severity ("info" to "critical"), the actor and remote address it concerns (either may be ""), how
    many audit entries it stands for, the times of the first and last, a one-line summary, and when it was found."""

    id: int
    kind: str
    severity: str
    actor: str
    remote: str
    count: int
    first_ts: str
    last_ts: str
    summary: str
    created_at: str


class SecurityScan(Shape):
    """What a scan read (audit entries after `since_id` up to `until_id`), the findings it raised, how many
    findings its message posted (0 when none), and whether entries remain to scan (`backlog`); `post_error`
    when the post failed (the findings stay stored and are posted by the next scan)."""

    scanned: int
    since_id: int
    until_id: int
    findings: list[SecurityFinding]
    posted: int
    backlog: bool
    post_error: str | None = None


class ChartRendered(Shape):
    """A chart as drawn: its kind and format, its size in pixels, its content (SVG text, or the PNG's bytes in
    base64), the content's size in bytes and SHA-256, how many rows it plots, and, when it was also written
    into the file root, its path there."""

    kind: str
    format: str
    width: int
    height: int
    content: str
    size: int
    sha256: str
    rows: int
    path: str | None = None


class DocumentWritten(FileWritten):
    """A document as the files pack wrote it into the file root (path, size, SHA-256) and its format ("docx",
    "xlsx", "pptx", "odt" or "ods")."""

    format: str


class DocumentContent(Shape):
    """A document of the file root as read: its path, size and SHA-256, its format (told by its content), its title
    ("" when none), its text (a line per paragraph, bullet, table row or sheet row, cells tab-separated) and whether
    that was cut at the pack's limits; then its structure: `blocks` (docx, odt: {"heading", "level"} with level 0 for
    the title, {"paragraph"}, {"bullets"}, {"table"}), `sheets` (xlsx, ods: sheet name to rows of cell values) or
    `slides` (pptx: {"title", "bullets"} and "tables" when a slide has any)."""

    path: str
    size: int
    sha256: str
    format: str
    title: str
    text: str
    truncated: bool
    blocks: list[dict[str, Any]] | None = None
    sheets: dict[str, list[list[Any]]] | None = None
    slides: list[dict[str, Any]] | None = None


def _files(op: str, summary: str, params: tuple[CapabilityParam, ...], returns: str, shape: type[Shape]) -> Capability:
    return Capability(f"files.{op}", summary, params, returns, shape=shape, pack="files")


CAPABILITIES: dict[str, Capability] = {
    c.name: c
    for c in [
        Capability(
            "conversations.create",
            "Create a conversation on the bus; returns {id, title, participants, created_by}.",
            (_p("title", "str"), _p("participants", "list[str]", [])),
            shape=Conversation,
        ),
        Capability(
            "conversations.post",
            "Post a message envelope to a conversation; returns the stored envelope.",
            (
                _p("conversation_id", "str"),
                _p("content", "str"),
                _p("kind", "str", "message"),
                _p("correlation_id", "str", ""),
            ),
            shape=Message,
        ),
        Capability(
            "conversations.history",
            "The newest `limit` envelopes of a conversation, oldest first.",
            (_p("conversation_id", "str"), _p("limit", "int", 50)),
            "list[dict]",
            shape=Message,
        ),
        Capability(
            "conversations.search",
            "Full-text search over every message of every conversation.",
            (_p("query", "str"), _p("limit", "int", 20)),
            "list[dict]",
            shape=Message,
        ),
        Capability(
            "conversations.list",
            "The conversations on the bus, newest first.",
            (_p("limit", "int", 50),),
            "list[dict]",
            shape=ConversationListing,
        ),
        Capability("models.list", "The model aliases this ecosystem can call.", (), "list[dict]", shape=ModelAliasInfo),
        Capability(
            "models.send",
            "Send a prompt to a model alias, charged to the caller's token budget.",
            (_p("model", "str"), _p("prompt", "str"), _p("max_tokens", "int", 256)),
            shape=ModelReply,
        ),
        Capability("models.budget", "Token budget, spent and remaining, per MAD and client.", (), shape=Budgets),
        Capability(
            "secrets.set",
            "Store a secret, encrypted at rest; returns {name, version}, never the value.",
            (_p("name", "str"), _p("value", "str")),
            shape=SecretVersion,
        ),
        Capability(
            "secrets.get",
            "Read a secret the caller is allowed to read; returns {name, version, value}.",
            (_p("name", "str"),),
            shape=SecretValue,
        ),
        Capability("secrets.list", "Names and versions of stored secrets, never values.", (), "list[dict]",
                   shape=SecretListing),
        Capability(
            "secrets.rotate",
            "Replace a secret's value with a new version; returns {name, version}.",
            (_p("name", "str"), _p("value", "str")),
            shape=SecretVersion,
        ),
        Capability(
            "secrets.rotate_key",
            "Re-encrypt every secret under a new key; returns {secrets, versions, key_id} (counts, never key material).",
            (),
            shape=KeyRotation,
        ),
        Capability(
            "secrets.audit",
            "The newest entries of the append-only secrets audit log.",
            (_p("limit", "int", 50),),
            "list[dict]",
            shape=SecretsAuditEntry,
        ),
        _files("write", "Write a file under the ecosystem's file root (utf-8 text, or base64 bytes), atomically; "
                        "returns {path, size, sha256}.",
               (_p("path", "str"), _p("content", "str"), _p("encoding", "str", "utf-8")), "dict", FileWritten),
        _files("read", "Read a file under the ecosystem's file root; returns {path, size, sha256, content}.",
               (_p("path", "str"), _p("encoding", "str", "utf-8")), "dict", FileContent),
        _files("list", "The entries of a folder of the file root (not recursive), by path.",
               (_p("path", "str", ""), _p("limit", "int", 1000)), "list[dict]", FileInfo),
        _files("stat", "A file's or folder's kind, size, time of change and (for a file) SHA-256.",
               (_p("path", "str"),), "dict", FileInfo),
        _files("move", "Move a file or folder inside the file root (never onto something that exists).",
               (_p("source", "str"), _p("destination", "str")), "dict", FileInfo),
        _files("delete", "Delete a file, or an empty folder, of the file root.", (_p("path", "str"),), "dict",
               FileDeleted),
        # --- data pack (Dewey) ---
        Capability("data.ingest", "Load CSV or TSV text (a header line first), JSON (an array of objects, or one object "
                                  "per line) or Parquet (base64) into a table of the data lake; mode 'create', 'replace' "
                                  "or 'append'. Returns {table, rows, columns, ingested, mode}.",
                   (_p("table", "str"), _p("content", "str"), _p("format", "str", "csv"), _p("mode", "str", "create")),
                   "dict", shape=DataIngested, pack="data"),
        Capability("data.ingest_file", "Load a CSV, TSV, JSON or Parquet file of the ecosystem's file root into a table "
                                       "of the data lake (format from the extension when ''); mode 'create', 'replace' "
                                       "or 'append'. Returns {table, rows, columns, ingested, mode}.",
                   (_p("table", "str"), _p("path", "str"), _p("format", "str", ""), _p("mode", "str", "create")),
                   "dict", shape=DataIngested, pack="data"),
        Capability("data.query", "Run one read-only SQL query (SELECT, WITH, VALUES, UNION...) over the lake's tables; "
                                 "returns {columns, rows, row_count, truncated}, at most `limit` rows.",
                   (_p("sql", "str"), _p("limit", "int", 1000)), "dict", shape=DataQueryResult, pack="data"),
        Capability("data.tables", "The tables of the data lake, by name, each with its row count and columns.", (),
                   "list[dict]", shape=DataTable, pack="data"),
        Capability("data.describe", "One table of the data lake: its row count and its columns with their types.",
                   (_p("table", "str"),), "dict", shape=DataTable, pack="data"),
        Capability("data.drop", "Delete a table of the data lake and everything in it.", (_p("table", "str"),), "dict",
                   shape=DataTableDropped, pack="data"),
        # --- end data pack ---
        # --- web pack (Marco) ---
        Capability("web.fetch", "Fetch a public web page (http or https; redirects followed and checked; robots.txt "
                                "obeyed) and return its text: format 'markdown' or 'text' (the main text of an HTML "
                                "page) or 'raw' (as served); max_bytes 0 means the ecosystem's limit. Returns {url, "
                                "status, content_type, title, content, size, sha256, redirects}.",
                   (_p("url", "str"), _p("format", "str", "markdown"), _p("max_bytes", "int", 0)), "dict",
                   shape=WebPage, pack="web"),
        Capability("web.robots", "Whether robots.txt lets this ecosystem's web user agent fetch a URL, and the rule "
                                 "that decided; returns {url, robots_url, user_agent, allowed, status, reason, rule}.",
                   (_p("url", "str"),), "dict", shape=RobotsVerdict, pack="web"),
        # --- end web pack ---
        # --- documents pack (Gates, Stallman) ---
        Capability("documents.write_docx", "Write a Word document into the file root: a title and blocks, each "
                                           "{heading, level 1-3}, {paragraph}, {bullets: [text]} or {table: rows of "
                                           "cells}; the same input gives the same bytes. Returns {path, size, sha256, "
                                           "format}.",
                   (_p("path", "str"), _p("title", "str"), _p("blocks", "list[dict]")), "dict",
                   shape=DocumentWritten, pack="documents"),
        Capability("documents.write_odt", "Write an OpenDocument text into the file root, from the same title and "
                                          "blocks as documents.write_docx. Returns {path, size, sha256, format}.",
                   (_p("path", "str"), _p("title", "str"), _p("blocks", "list[dict]")), "dict",
                   shape=DocumentWritten, pack="documents"),
        Capability("documents.write_xlsx", "Write an Excel workbook into the file root: sheets maps each sheet name "
                                           "to its rows, lists of text, numbers, true/false or null; text is always "
                                           "stored as text, never as a formula. Returns {path, size, sha256, format}.",
                   (_p("path", "str"), _p("sheets", "dict")), "dict", shape=DocumentWritten, pack="documents"),
        Capability("documents.write_ods", "Write an OpenDocument spreadsheet into the file root, from the same sheets "
                                          "as documents.write_xlsx. Returns {path, size, sha256, format}.",
                   (_p("path", "str"), _p("sheets", "dict")), "dict", shape=DocumentWritten, pack="documents"),
        Capability("documents.write_pptx", "Write a PowerPoint deck into the file root: a title slide, then one slide "
                                           "per {title, bullets: [text]}. Returns {path, size, sha256, format}.",
                   (_p("path", "str"), _p("title", "str"), _p("slides", "list[dict]")), "dict",
                   shape=DocumentWritten, pack="documents"),
        Capability("documents.read", "Read a docx, xlsx, pptx, odt or ods file of the file root (the format told by "
                                     "its content; macro-enabled files refused): returns {path, size, sha256, format, "
                                     "title, text, truncated} and its blocks, sheets or slides.",
                   (_p("path", "str"),), "dict", shape=DocumentContent, pack="documents"),
        # --- end documents pack ---
        # --- charts pack (Playfair) ---
        Capability(
            "charts.render",
            "Draw a bar, line, scatter or pie chart of rows as SVG or PNG (the same bytes for the same input); x and "
            "y name the fields plotted (pie: x the category, y its value), series an optional colour field; with "
            "path, also write it into the file root; returns {kind, format, width, height, content, size, sha256, "
            "rows, path}.",
            (_p("kind", "str"), _p("rows", "list[dict]"), _p("x", "str"), _p("y", "str"), _p("title", "str", ""),
             _p("format", "str", "svg"), _p("series", "str", ""), _p("path", "str", ""), _p("width", "int", 0),
             _p("height", "int", 0)),
            shape=ChartRendered,
            pack="charts",
        ),
        # --- end charts pack ---
        # --- security pack (McNamara) ---
        Capability("security.scan", "Scan the audit entries new since the last scan for denial spikes, failed "
                                    "sign-in bursts, first-time actions and secret reads, and audit-chain damage; "
                                    "store the findings and (post=true) post the unposted ones to the security "
                                    "conversation. window_minutes 0 uses the pack's setting. Returns {scanned, "
                                    "since_id, until_id, findings, posted, backlog}.",
                   (_p("window_minutes", "int", 0), _p("post", "bool", True)), "dict", shape=SecurityScan,
                   pack="security"),
        Capability("security.findings", "Stored security findings, newest first; severity '' for all, else only "
                                        "those at least that severe (info, low, medium, high, critical).",
                   (_p("limit", "int", 50), _p("severity", "str", "")), "list[dict]", shape=SecurityFinding,
                   pack="security"),
        Capability("security.report", "A MAD's own security report, stored as a finding of kind 'report' under "
                                      "its name and posted by the next scan; returns the finding.",
                   (_p("summary", "str"), _p("severity", "str", "info")), "dict", shape=SecurityFinding,
                   pack="security"),
        # --- end security pack ---
        Capability("ecosystem.status", "Health of the ecosystem and of each MAD.", (), shape=EcosystemStatus),
        Capability("ecosystem.mads", "Every MAD with its role, level and tools.", (), "list[dict]", shape=MadInfo),
    ]
}

# Each pack: what it is for, the pinned packages it needs in an artifact that uses it, and how it enters one
# (`kind`): a capability pack when a tool is bound to one of its capabilities; a deployment pack, which serves
# the operator rather than a tool, when the spec names it under `packs:` in ecosystem.yaml; the roles pack when
# the spec has a role (a MAD with `lifecycle: ephemeral`).
@dataclass(frozen=True)
class PackInfo:
    name: str
    summary: str
    dependencies: tuple[str, ...] = ()  # pinned (name==version), as the artifact's pyproject lists them
    requires: tuple[str, ...] = ()  # packs loaded with this one, reached through PackContext.peer
    kind: Literal["capabilities", "deployment", "roles"] = "capabilities"


PACKS: dict[str, PackInfo] = {p.name: p for p in [
    PackInfo("files", "One file root per ecosystem: read, write, list, stat, move, delete; no way out of the root "
                      "(.., absolute paths, symlinks, hard links), size quotas, content hashes"),
    PackInfo("data", "One embedded DuckDB data lake per ecosystem: tables loaded from CSV, TSV, JSON and Parquet "
                     "(inline or from the file root), read-only SQL checked against an allow-list, row, time and "
                     "memory limits", dependencies=("duckdb==2.0.1", "sqlglot==30.31.0"), requires=("files",)),
    PackInfo("web", "Guarded GETs of public web pages as markdown or text: http(s) only, every resolved address "
                    "checked public (no loopback, private, link-local or metadata addresses) and connected to as "
                    "checked, redirects re-checked, robots.txt obeyed, size and time limits",
             dependencies=("trafilatura==2.3.1", "lxml==6.2.0")),
    PackInfo("charts", "Bar, line, scatter and pie charts of rows as SVG or PNG with the same bytes for the same "
                       "input (Vega-Lite in a sandboxed renderer process: spec built by the pack, data inline, no "
                       "URLs, bundled font); row, size, title, time and output limits; saved through the files pack",
             dependencies=("vl-convert-python==1.9.0.post1",), requires=("files",)),
    PackInfo("documents", "Word, Excel and PowerPoint (docx, xlsx, pptx) and OpenDocument (odt, ods) files written "
                          "from plain data through the files pack (byte-reproducible, text never a formula, size "
                          "limits) and read back as text and structure (zip-bomb, XXE/DTD and macro guards first)",
             dependencies=("python-docx==1.2.0", "openpyxl==3.1.5", "python-pptx==1.0.2", "odfpy==1.4.1",
                           "lxml==6.2.0", "defusedxml==0.7.1"), requires=("files",)),
    PackInfo("security", "Security operations over the audit log: denial spikes, failed sign-in bursts, first-time "
                         "actions and secret reads against a rolling baseline, audit-chain damage; findings stored, "
                         "deduplicated and posted to the security conversation; MADs' own reports (stdlib only)"),
    PackInfo("redis", "The Redis Streams bus: several processes, on one host or several, serve the ecosystem's "
                      "MADs over one Redis (`serve --bus redis://...`), with failover and `bus status|forget`",
             dependencies=("redis==8.1.0",), kind="deployment"),
    PackInfo("tracing", "OpenTelemetry traces of tool calls, bus hops and MAD handlers, exported over OTLP/HTTP "
                        "once an endpoint is configured (`serve --otlp-endpoint URL`)",
             dependencies=("opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2",
                           "opentelemetry-exporter-otlp-proto-http==1.45.2"), kind="deployment"),
    PackInfo("emads", "Ephemeral MADs: instances of a role spawned for a task, capped per role, their reports kept "
                      "for the role's next instances", kind="roles"),
]}


def packs_of(capability_names: Iterable[str]) -> frozenset[str]:
    """The packs these capabilities need, with the packs those require (unknown names and core capabilities
    need none)."""
    return with_required(CAPABILITIES[n].pack for n in capability_names if n in CAPABILITIES and CAPABILITIES[n].pack)


def packs_for(capability_names: Iterable[str], named: Iterable[str], has_roles: bool) -> frozenset[str]:
    """The packs an ecosystem uses: those of the capabilities its tools are bound to, the deployment packs among
    the names under its `packs:`, and the roles pack when it has a role; with the packs those require."""
    deployment = [n for n in named if n in PACKS and PACKS[n].kind == "deployment"]
    return packs_of(capability_names) | with_required([*deployment, *(["emads"] if has_roles else [])])


def with_required(packs: Iterable[str]) -> frozenset[str]:
    """These packs and every pack they require, transitively (names not in PACKS are dropped)."""
    found: set[str] = set()
    todo = [p for p in packs if p in PACKS]
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(PACKS[name].requires)
    return frozenset(found)


def available(packs: Iterable[str]) -> dict[str, Capability]:
    """The catalogue an ecosystem with these packs has: the core's capabilities and its packs'."""
    chosen = set(packs)
    return {name: c for name, c in CAPABILITIES.items() if not c.pack or c.pack in chosen}


# Granted to every MAD whatever it owns, each narrowed by the kernel per call: its own Thought
# Engine (charged to its own budget); reading and posting in the conversations it joined; reading
# the secrets named in its `secrets` list (the secrets manager refuses, and audits, any other name).
ALWAYS_GRANTED: frozenset[str] = frozenset(
    {"models.send", "conversations.post", "conversations.history", "secrets.get", "secrets.list"}
)


def granted(owns: tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """The capabilities a MAD may call: every one of the families it owns, plus the always-granted ones."""
    return frozenset({name for name in CAPABILITIES if name.split(".", 1)[0] in owns} | ALWAYS_GRANTED)


# What MCP clients are told about a tool bound to each capability (MCP tool annotations): whether it
# only reads, whether it may destroy (overwrite or delete what was there), and whether calling it twice
# with the same arguments does no more than once. The core's writes keep history (a secret's old
# versions stay, a post is added); a file written over or deleted is gone.
READ_ONLY: frozenset[str] = frozenset({
    "conversations.history", "conversations.search", "conversations.list", "models.list", "models.budget",
    "secrets.get", "secrets.list", "secrets.audit", "ecosystem.status", "ecosystem.mads",
    "files.read", "files.list", "files.stat",
    "data.query", "data.tables", "data.describe",
    "web.fetch", "web.robots",
    "security.findings",
    "documents.read",
    # --- read-only pack capabilities ---
})
IDEMPOTENT_WRITES: frozenset[str] = frozenset({"secrets.set", "files.write", "charts.render",
                                               "documents.write_docx", "documents.write_odt", "documents.write_xlsx",
                                               "documents.write_ods", "documents.write_pptx"})
DESTRUCTIVE: frozenset[str] = frozenset({"files.write", "files.delete", "charts.render",
                                         "data.ingest", "data.ingest_file", "data.drop",
                                         "documents.write_docx", "documents.write_odt", "documents.write_xlsx",
                                         "documents.write_ods", "documents.write_pptx"})  # overwrite or remove what was there


# What reaches beyond the ecosystem (MCP's openWorldHint, which clients assume when a tool does not say).
OPEN_WORLD: frozenset[str] = frozenset({"web.fetch", "web.robots"})


def tool_hints(capability: str) -> dict[str, bool]:
    """The MCP annotations of a tool bound to `capability` ({} for an unknown one)."""
    if capability not in CAPABILITIES:
        return {}
    read_only = capability in READ_ONLY
    return {"readOnlyHint": read_only, "destructiveHint": capability in DESTRUCTIVE,
            "idempotentHint": read_only or capability in IDEMPOTENT_WRITES, "openWorldHint": capability in OPEN_WORLD}
