"""Units are written against the kernel's API, not its implementation: an edit inside the kernel that keeps the
API regenerates no unit (a paid call each with a real model), while the kernel's files are still copied fresh."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from generator import kernel_contract
from generator.artifact.manifest import Manifest
from generator.spec.starter import init

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel_copy(tmp_path, monkeypatch):
    """The kernel_contract reading a copy of the kernel, which a test may edit."""
    folder = tmp_path / "kernel"
    shutil.copytree(kernel_contract.KERNEL_DIR, folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(kernel_contract, "KERNEL_DIR", folder)
    for cached in (kernel_contract.api_text, kernel_contract.api_hash, kernel_contract.reserved_names,
                   kernel_contract.kernel_tables):
        cached.cache_clear()
    yield folder
    for cached in (kernel_contract.api_text, kernel_contract.api_hash, kernel_contract.reserved_names,
                   kernel_contract.kernel_tables):
        cached.cache_clear()


def _api_hash() -> str:
    kernel_contract.api_text.cache_clear()
    kernel_contract.api_hash.cache_clear()
    kernel_contract.reserved_names.cache_clear()
    return kernel_contract.api_hash()


def test_a_stylesheet_or_a_private_helper_changes_no_api(kernel_copy):
    before = _api_hash()
    with (kernel_copy / "packs" / "console" / "assets.py").open("a") as f:
        f.write("\n# a new shade of blue for the sign-in page\n")
    mad = kernel_copy / "mad.py"
    mad.write_text(mad.read_text().replace("class Mad:", "def _internal_helper() -> None:\n    return None\n\n\nclass Mad:"))
    assert _api_hash() == before


@pytest.mark.parametrize("edit", [
    lambda text: text.replace("    async def think(self,", "    async def ponder(self, prose: str) -> str:\n"
                                                           "        return prose\n\n    async def think(self,"),
    lambda text: text.replace("Call a kernel capability", "Call any kernel capability"),
])
def test_a_public_method_or_its_docstring_changes_the_api(kernel_copy, edit):
    before = _api_hash()
    mad = kernel_copy / "mad.py"
    mad.write_text(edit(mad.read_text()))
    assert _api_hash() != before


def test_the_kernel_files_are_read_in_one_place():
    """No module of the compiler but kernel_contract names a kernel file by path (packs will move them)."""
    offenders = []
    for path in (REPO / "generator").rglob("*.py"):
        if "kernel" in path.relative_to(REPO / "generator").parts or path.name == "kernel_contract.py":
            continue
        text = path.read_text()
        if '"mad.py"' in text or '"db.py"' in text or '/ "kernel"' in text:
            offenders.append(path.relative_to(REPO).as_posix())
    assert offenders == []


def _regen(compiler: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(compiler))
    return subprocess.run([sys.executable, "-m", "generator.cli", *args], cwd=compiler, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_a_kernel_change_that_keeps_its_api_rebuilds_with_every_unit_reused(tmp_path):
    compiler = tmp_path / "compiler"  # a copy of the compiler, whose kernel this test edits
    shutil.copytree(REPO / "generator", compiler / "generator", ignore=shutil.ignore_patterns("__pycache__"))
    spec, out = tmp_path / "spec", tmp_path / "ecosystems"
    init(spec, name="notes")
    build = ["regenerate", "--spec", str(spec), "--out", str(out), "--pipeline", str(REPO / "pipelines" / "offline.toml"),
             "--quiet"]
    first = _regen(compiler, *build)
    assert first.returncode == 0, first.stderr
    static = compiler / "generator" / "kernel" / "metrics.py"  # a core file (notes has no console)
    with static.open("a") as f:
        f.write("\n# a comment on the metrics\n")
    second = _regen(compiler, *build)
    assert second.returncode == 0, second.stderr
    manifest = Manifest.read(out / "notes" / "1.0.1")
    assert {unit: lock.reused_from for unit, lock in manifest.lock.items()} == {
        "frame": "1.0.0", "mad:desk": "1.0.0", "mad:vault": "1.0.0"}
    assert manifest.tokens.prompt == 0 and manifest.sandbox.passed > 10 and manifest.sandbox.failed == 0
    shipped = out / "notes" / "1.0.1" / "src" / "notes" / "kernel" / "metrics.py"
    assert shipped.read_bytes() == static.read_bytes(), "the kernel's files are copied fresh"

    mad = compiler / "generator" / "kernel" / "mad.py"
    mad.write_text(mad.read_text().replace("Call a kernel capability", "Call any kernel capability"))
    third = _regen(compiler, *build)
    assert third.returncode == 0, third.stderr
    manifest = Manifest.read(out / "notes" / "1.0.2")
    assert not any(lock.reused_from for lock in manifest.lock.values())
    assert all("kernel_api" in lock.regenerated_because for lock in manifest.lock.values())


def test_an_artifact_carries_only_the_capability_packs_its_spec_uses():
    core = kernel_contract.kernel_files("eco")
    assert "eco/kernel/packs/__init__.py" in core and "eco/kernel/runtime.py" in core
    assert not [p for p in core if p.startswith("eco/kernel/packs/") and not p.endswith("packs/__init__.py")]
    with_files = kernel_contract.kernel_files("eco", {"files"})
    assert set(with_files) - set(core) == {"eco/kernel/packs/files/__init__.py", "eco/kernel/packs/files/pack.py"}
    assert kernel_contract.pack_dependencies({"files"}) == ()
    with_redis = kernel_contract.kernel_files("eco", {"redis"})
    assert set(with_redis) - set(core) == {"eco/kernel/packs/redis/__init__.py", "eco/kernel/packs/redis/pack.py",
                                           "eco/kernel/packs/redis/cli.py"}  # its bus commands and serve options
    assert kernel_contract.pack_dependencies({"redis"}) == ("redis==8.1.0",)
    assert not [d for d in kernel_contract.RUNTIME_DEPENDENCIES if d.startswith(("redis", "opentelemetry"))]


def test_a_pack_s_tests_stay_in_regen_out_of_every_artifact_and_every_build_s_inputs(tmp_path, monkeypatch):
    """A pack's folder holds its tests (tests/) beside its code, and packs/ the conftest.py they share: regen's own,
    so no artifact carries them, the static review does not count them as the kernel's, and editing one changes no
    build's inputs (no new version for a test-only change); editing the pack's code does."""
    from generator.build import prepare
    from generator.config import load_pipeline
    from generator.kernel.capabilities import PACKS
    from generator.spec.load import load_spec

    kernel = kernel_contract.KERNEL_DIR
    tests = sorted(p for p in (kernel / "packs").glob("*/tests/test_*.py"))
    assert {p.parts[-3] for p in tests} >= {"files", "data", "web", "charts", "documents", "security", "emads",
                                            "console", "redis"}
    assert (kernel / "packs" / "conftest.py").is_file()
    shipped = kernel_contract.kernel_files("eco", PACKS)
    assert "eco/kernel/packs/files/pack.py" in shipped and "eco/kernel/packs/console/pages.py" in shipped
    assert not [p for p in shipped if "/tests/" in p or p.endswith("conftest.py")]
    assert not {hashlib.sha256(p.read_bytes()).hexdigest() for p in tests} & kernel_contract.kernel_digests()
    assert kernel_contract.kernel_test_file("packs/files/tests/test_files.py")
    assert kernel_contract.kernel_test_file("packs/conftest.py")
    assert not kernel_contract.kernel_test_file("packs/files/pack.py")
    assert not kernel_contract.kernel_test_file("transport.py")
    # The test harness is regen's too: copied into every artifact's tests, known by its digest, and shown to the senior.
    assert shipped[kernel_contract.HARNESS_PATH] == kernel_contract.HARNESS.read_bytes()
    assert hashlib.sha256(kernel_contract.HARNESS.read_bytes()).hexdigest() in kernel_contract.kernel_digests()
    assert "The test harness (`tests/harness.py`" in kernel_contract.api_text()
    assert "- `def running_ecosystem(package: str" in kernel_contract.api_text()

    compiler = tmp_path / "generator"
    shutil.copytree(REPO / "generator", compiler, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(prepare, "GENERATOR", compiler)
    spec, pipeline = load_spec(REPO / "spec"), load_pipeline(REPO / "pipelines" / "offline.toml")
    before = prepare.fingerprint(spec, pipeline, None)
    assert "generator/kernel/packs/files/pack.py" in before.inputs
    assert not [k for k in before.inputs if "/tests/" in k or k.endswith("conftest.py")]
    with (compiler / "kernel" / "packs" / "files" / "tests" / "test_files.py").open("a") as f:
        f.write("\n# one more comment in a test\n")
    (compiler / "kernel" / "packs" / "conftest.py").write_text("")
    assert prepare.fingerprint(spec, pipeline, None) == before
    with (compiler / "kernel" / "packs" / "files" / "pack.py").open("a") as f:
        f.write("\n# one more comment in the pack\n")
    assert prepare.fingerprint(spec, pipeline, None).hash != before.hash


def test_the_web_console_is_copied_whole_and_only_into_an_artifact_whose_spec_names_it():
    """The console pack is a folder of modules, templates and static files: an artifact without it has none of
    them (and no web surface), one with it has every file, bytes as in the compiler."""
    from generator.kernel.capabilities import packs_for

    assert packs_for((), {}, False) == frozenset() and packs_for((), {"console": {}}, False) == {"console"}
    without = kernel_contract.kernel_files("eco", packs_for((), {}, False))
    assert not [p for p in without if "console" in p or p.endswith((".html", ".css", ".js", ".svg"))]
    console = kernel_contract.KERNEL_DIR / "packs" / "console"
    with_console = kernel_contract.kernel_files("eco", packs_for((), {"console": {}}, False))
    added = {p.removeprefix("eco/kernel/packs/console/"): data for p, data in with_console.items() if p not in without}
    assert {"__init__.py", "pack.py", "pages.py", "assets.py", "templates/signin.html", "templates/chat.html",
            "static/grace.css", "static/grace.js", "static/grace.svg"} <= set(added)
    assert set(added) == {p.relative_to(console).as_posix() for p in console.rglob("*")
                          if p.is_file() and "__pycache__" not in p.parts and "tests" not in p.parts}
    assert all(data == (console / rel).read_bytes() for rel, data in added.items())
    assert kernel_contract.pack_dependencies({"console"}) == ()  # starlette is the core's already


def test_a_model_provider_s_code_comes_only_with_an_alias_that_uses_it(tmp_path):
    """The offline echo model is the core's: an artifact whose model aliases all use it carries no code that sends
    a prompt over the network. An alias with `provider: openai` brings the openai pack."""
    from generator.kernel.capabilities import packs_for
    from generator.spec.load import load_spec

    assert packs_for((), {}, False, providers={"echo"}) == frozenset()
    assert packs_for((), {}, False, providers={"echo", "openai"}) == {"openai"}
    echo_only = load_spec(REPO / "spec")
    assert {a.provider for a in echo_only.ecosystem.models.values()} == {"echo"} and "openai" not in echo_only.packs
    carried = kernel_contract.kernel_files("madgroup", echo_only.packs)
    assert not [path for path, data in carried.items() if b"\"/chat/completions\"" in data]
    spec = shutil.copytree(REPO / "spec", tmp_path / "spec")
    yaml = (spec / "ecosystem.yaml").read_text()
    (spec / "ecosystem.yaml").write_text(yaml.replace("    provider: echo\n", "    provider: echo\n  gpt:\n    provider: "
                                                      "openai\n    model: gpt-x\n    api_base: http://127.0.0.1:9/v1\n", 1))
    with_openai = load_spec(spec)
    assert with_openai.packs == echo_only.packs | {"openai"}
    added = set(kernel_contract.kernel_files("madgroup", with_openai.packs)) - set(carried)
    assert added == {"madgroup/kernel/packs/openai/__init__.py", "madgroup/kernel/packs/openai/pack.py"}


# What the packs' pinned dependencies are called: a core that names none of them carries none of the packs'
# catalogues either (redis and opentelemetry by their pins: the core's bus and tracing name them in prose).
PACK_LIBRARIES = ("psycopg", "psycopg-binary", "duckdb", "sqlglot",
                  "trafilatura", "lxml", "vl-convert", "vl_convert", "python-docx", "openpyxl",
                  "python-pptx", "odfpy", "defusedxml", "redis==", "opentelemetry-sdk")


def test_a_kernel_without_packs_carries_no_pack_and_none_of_their_dependencies():
    from generator.kernel.capabilities import PACKS

    core = kernel_contract.kernel_files("eco", ())
    assert [p for p in core if p.startswith("eco/kernel/packs/")] == ["eco/kernel/packs/__init__.py"]
    pins = [pin for info in PACKS.values() for pin in info.dependencies]
    assert {name.split("==")[0] for name in pins} <= {n.removesuffix("==") for n in PACK_LIBRARIES} | {
        "redis", "opentelemetry-api", "opentelemetry-exporter-otlp-proto-http", "vl-convert-python"}
    mentions = {(path, name) for path, data in core.items() for name in (*PACK_LIBRARIES, *pins)
                if name.lower() in data.decode("utf-8", "replace").lower()}
    assert not mentions


def test_an_artifact_s_catalogue_lists_only_the_packs_it_carries(tmp_path):
    from generator.kernel.capabilities import with_required

    for rel, data in kernel_contract.kernel_files("eco", with_required({"documents"})).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "eco" / "__init__.py").write_text("")
    probe = ("from eco.kernel.capabilities import CAPABILITIES, PACKS, READ_ONLY, available\n"
             "print(sorted(PACKS), sorted({c.pack for c in CAPABILITIES.values()}), 'documents.read' in READ_ONLY,\n"
             "      'data.query' in READ_ONLY, len(available(['documents'])) == len(CAPABILITIES))")
    got = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["['documents',", "'files']", "['',", "'documents',", "'files']", "True", "False",
                                  "False"]


@pytest.mark.parametrize("pack", ["files", "data", "web", "charts", "documents", "security", "redis", "tracing",
                                  "console", "emads", "storage", "openai"])
def test_a_pack_s_catalogue_imports_none_of_its_libraries(pack):
    """The compiler reads every pack's catalogue, with or without the pack's libraries installed: importing it
    with them blocked works, and imports no pack's implementation."""
    blocked = ("duckdb", "sqlglot", "trafilatura", "lxml", "vl_convert", "docx", "openpyxl", "pptx", "odf",
               "defusedxml", "redis", "opentelemetry")
    probe = (f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
             f"import generator.kernel.packs.{pack} as catalogue\n"
             "from generator.kernel.capabilities import CAPABILITIES, PACKS\n"
             f"assert PACKS[{pack!r}] is catalogue.PACK\n"
             "assert not [m for m in sys.modules if m.startswith('generator.kernel.packs.') and m.endswith('.pack')]\n"
             f"print(sorted(c for c, cap in CAPABILITIES.items() if cap.pack == {pack!r}))")
    got = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    from generator.kernel.capabilities import CAPABILITIES

    assert got.stdout.strip() == str(sorted(c for c, cap in CAPABILITIES.items() if cap.pack == pack))


def test_a_pack_changes_the_api_only_of_the_specs_that_use_it():
    from generator.kernel.capabilities import CAPABILITIES, PACKS, available

    kinds = {kind: {name for name, info in PACKS.items() if info.kind == kind}
             for kind in ("capabilities", "deployment", "roles", "storage", "provider")}
    assert kinds["capabilities"] == {c.pack for c in CAPABILITIES.values() if c.pack}
    assert kinds["deployment"] == {"redis", "tracing", "console", "postgres"}  # none of these has a capability
    assert kinds["roles"] == {"emads"} and kinds["storage"] == {"storage"} and kinds["provider"] == {"openai"}
    assert sum(map(len, kinds.values())) == len(PACKS)
    assert not [c for c in available(()).values() if c.pack]
    assert {c.name for c in available({"files"}).values() if c.pack} == {
        "files.write", "files.read", "files.list", "files.stat", "files.move", "files.delete"}
    kernel_contract.api_hash.cache_clear()
    assert kernel_contract.api_hash() != kernel_contract.api_hash(frozenset({"files"}))
