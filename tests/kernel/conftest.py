"""Fixtures shared by kernel tests: a tiny generated-looking ecosystem package in a temp dir.

`build_ecosystem(root, name)` writes `<root>/<name>/` exactly as the generator's templates
would (kernel copied verbatim, mads/, ecosystem.py, __main__.py) and returns the package dir.
The session fixture `tiny_ecosystem` builds one and puts its root on sys.path.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from generator.kernel_contract import kernel_sources

MADS = {
    "turing": '''from __future__ import annotations
from ..kernel import Mad, tool


class Turing(Mad):
    name = "turing"
    role = "Secrets keeper <of the group>"
    level = "V1"
    lifecycle = "persistent"
    conversations = ("security",)
    talks_to = ()
    secrets = ()
    owns = ("secrets",)
    budget_tokens = 100000
    storage = ({"name": "notes", "columns": [{"name": "id", "type": "integer", "primary_key": True, "nullable": False}, {"name": "body", "type": "text", "primary_key": False, "nullable": True}]},)
    imperator_model = "default"
    imperator_prompt = """You are Turing, keeper of secrets."""

    @tool
    async def set_secret(self, name: str, value: str) -> dict:
        """Store a secret, encrypted at rest."""
        return await self.use("secrets.set", name=name, value=value)

    @tool
    async def get_secret(self, name: str) -> dict:
        """Read a secret."""
        return await self.use("secrets.get", name=name)

    @tool
    async def rotate_secret(self, name: str, value: str) -> dict:
        """Rotate a secret."""
        return await self.use("secrets.rotate", name=name, value=value)

    @tool
    async def list_secrets(self) -> list[dict]:
        """Names and versions."""
        return await self.use("secrets.list")

    @tool
    async def audit(self, limit: int = 50) -> list[dict]:
        """The audit log."""
        return await self.use("secrets.audit", limit=limit)
''',
    "rogers": '''from __future__ import annotations
from ..kernel import Mad, tool


class Rogers(Mad):
    name = "rogers"
    role = "Conversation bus keeper"
    level = "V1"
    lifecycle = "persistent"
    conversations = ("general", "security")
    talks_to = ("turing",)
    secrets = ("db_password",)
    owns = ("conversations",)
    budget_tokens = 100000
    storage = ()
    imperator_model = "default"
    imperator_prompt = """You are Rogers."""

    @tool
    async def create_conversation(self, title: str, participants: list[str] = []) -> dict:
        """Create a conversation."""
        return await self.use("conversations.create", title=title, participants=participants)

    @tool
    async def post(self, conversation_id: str, content: str, kind: str = "message", correlation_id: str = "") -> dict:
        """Post a message."""
        return await self.use("conversations.post", conversation_id=conversation_id, content=content, kind=kind, correlation_id=correlation_id)

    @tool
    async def history(self, conversation_id: str, limit: int = 50) -> list[dict]:
        """History of a conversation."""
        return await self.use("conversations.history", conversation_id=conversation_id, limit=limit)

    @tool
    async def search(self, query: str, limit: int = 20) -> list[dict]:
        """Search messages."""
        return await self.use("conversations.search", query=query, limit=limit)

    @tool
    async def list_conversations(self, limit: int = 50) -> list[dict]:
        """List conversations."""
        return await self.use("conversations.list", limit=limit)
''',
    "fiedler": '''from __future__ import annotations
from ..kernel import Mad, tool


class Fiedler(Mad):
    name = "fiedler"
    role = "Model gateway"
    level = "V1"
    lifecycle = "persistent"
    conversations = ("general",)
    talks_to = ()
    secrets = ()
    owns = ("models",)
    budget_tokens = 60
    storage = ()
    imperator_model = "default"
    imperator_prompt = """You are Fiedler."""

    @tool
    async def send(self, model: str, prompt: str, max_tokens: int = 256) -> dict:
        """Send a prompt to a model alias."""
        return await self.use("models.send", model=model, prompt=prompt, max_tokens=max_tokens)

    @tool
    async def models(self) -> list[dict]:
        """Model aliases."""
        return await self.use("models.list")

    @tool
    async def budget(self) -> dict:
        """Budgets."""
        return await self.use("models.budget")
''',
    "grace": '''from __future__ import annotations
from ..kernel import Mad, tool


class Grace(Mad):
    name = "grace"
    role = "User interface"
    level = "V1"
    lifecycle = "persistent"
    conversations = ("general",)
    talks_to = ("rogers",)
    secrets = ()
    owns = ("ecosystem",)
    budget_tokens = 100000
    storage = ()
    imperator_model = "default"
    imperator_prompt = """You are Grace."""

    @tool
    async def status(self) -> dict:
        """Ecosystem health."""
        return await self.use("ecosystem.status")

    @tool
    async def mads(self) -> list[dict]:
        """Every MAD."""
        return await self.use("ecosystem.mads")

    @tool
    async def chat(self, message: str) -> str:
        """Talk to the ecosystem in prose."""
        return await self.think(message)
''',
}

# The tool bound to each capability, as the generator writes `capability_tools` into ecosystem.py.
CAPABILITY_TOOLS = {
    "conversations.create": "rogers.create_conversation", "conversations.post": "rogers.post",
    "conversations.history": "rogers.history", "conversations.search": "rogers.search",
    "conversations.list": "rogers.list_conversations",
    "secrets.set": "turing.set_secret", "secrets.get": "turing.get_secret", "secrets.rotate": "turing.rotate_secret",
    "secrets.list": "turing.list_secrets", "secrets.audit": "turing.audit",
    "models.send": "fiedler.send", "models.list": "fiedler.models", "models.budget": "fiedler.budget",
    "ecosystem.status": "grace.status", "ecosystem.mads": "grace.mads",
}


def build_ecosystem(root: Path, name: str, client_budget_tokens: int = 100000) -> Path:
    """Write a tiny ecosystem package `<root>/<name>/` like the generator does; return its dir."""
    pkg = root / name
    for rel, path in kernel_sources().items():  # the whole kernel, every pack, without regen's tests of it
        (pkg / "kernel" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, pkg / "kernel" / rel)
    (pkg / "mads").mkdir(parents=True)
    for mod, src in MADS.items():
        (pkg / "mads" / f"{mod}.py").write_text(src)
    (pkg / "mads" / "__init__.py").write_text(
        "from .turing import Turing\nfrom .rogers import Rogers\nfrom .fiedler import Fiedler\n"
        "from .grace import Grace\n\nMADS = (Turing, Rogers, Fiedler, Grace)\n"
    )
    (pkg / "__init__.py").write_text(f'"""The {name} ecosystem."""\n')
    (pkg / "ecosystem.py").write_text(
        "from .kernel import EcosystemConfig, ModelAlias\nfrom .mads import MADS\n\n"
        f'CONFIG = EcosystemConfig(name="{name}", description="A tiny <test> ecosystem & friends", '
        'models={"default": ModelAlias(provider="echo", model="", api_base="", api_key_secret="")}, '
        f"client_budget_tokens={client_budget_tokens}, mads=MADS, capability_tools={CAPABILITY_TOOLS!r}, "
        'pack_settings={"console": {}}, '
        'tool_hints={"rogers.history": {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True}, '
        '"rogers.post": {"readOnlyHint": False, "destructiveHint": False, "idempotentHint": False}})\n'
    )
    (pkg / "__main__.py").write_text(
        "from .kernel.cli import main\nfrom .ecosystem import CONFIG\n\nraise SystemExit(main(CONFIG))\n"
    )
    return pkg


@pytest.fixture(scope="session")
def tiny_ecosystem(tmp_path_factory):
    """(root_dir, package_name): a built ecosystem importable in-process (root on sys.path)."""
    root = tmp_path_factory.mktemp("eco")
    name = f"tinyeco_{uuid.uuid4().hex[:8]}"
    build_ecosystem(root, name)
    with importable(root):
        yield root, name


@contextmanager
def importable(root: Path) -> Iterator[None]:
    """The ecosystems built under `root` importable in-process while the block runs."""
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(root))


def without_pack(tmp_path_factory, prefix: str, pack: str) -> tuple[Path, str]:
    """(root, package name) of the tiny ecosystem built with no copy of `pack` (a build whose spec does not use it)."""
    root = tmp_path_factory.mktemp(prefix)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    shutil.rmtree(build_ecosystem(root, name) / "kernel" / "packs" / pack)
    return root, name


@pytest.fixture(scope="session")
def eco_modules(tiny_ecosystem):
    """The imported package's (config, kernel package, runtime module)."""
    _, name = tiny_ecosystem
    config = importlib.import_module(f"{name}.ecosystem").CONFIG
    kernel = importlib.import_module(f"{name}.kernel")
    runtime_mod = importlib.import_module(f"{name}.kernel.runtime")
    return config, kernel, runtime_mod


@pytest.fixture
def runtime(eco_modules, tmp_path, monkeypatch):
    """A started in-process Runtime of the tiny ecosystem with a fresh state dir (stopped after)."""
    import asyncio

    config, _, runtime_mod = eco_modules
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    rt = runtime_mod.Runtime(config, tmp_path / "state")
    asyncio.run(rt.start())
    yield rt
    if rt.running:
        asyncio.run(rt.stop())


@pytest.fixture(scope="module")
def grace_eco(tiny_ecosystem, tmp_path_factory, request):
    """The tiny ecosystem with Grace talking to Fiedler (as madgroup's does) and room in Fiedler's budget,
    under a name of its own per test module (`<module>_<hex>`)."""
    src_root, src_name = tiny_ecosystem
    prefix = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    root = tmp_path_factory.mktemp(prefix)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    shutil.copytree(src_root / src_name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, old, new in [
        ("ecosystem.py", f'name="{src_name}"', f'name="{name}"'),
        ("mads/grace.py", 'talks_to = ("rogers",)', 'talks_to = ("rogers", "fiedler")'),
        ("mads/fiedler.py", "budget_tokens = 60", "budget_tokens = 100000"),
    ]:
        path = root / name / rel
        assert old in path.read_text(), f"{rel} no longer has {old!r}; update this fixture"
        path.write_text(path.read_text().replace(old, new))
    with importable(root):
        yield root, name
