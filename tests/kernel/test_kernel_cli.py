from __future__ import annotations

import argparse
import importlib
import os
import shutil
import stat
import subprocess
import sys

import pytest


def _run(root, name, *args):
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-m", name, *args], env=env, capture_output=True, text=True, timeout=60)


def test_token_is_created_once_and_kept_private(tiny_ecosystem, tmp_path):
    root, name = tiny_ecosystem
    state = tmp_path / "state"
    first = _run(root, name, "token", "--state", str(state))
    assert first.returncode == 0, first.stderr
    path = first.stdout.strip()
    assert path == str((state / "client-token").resolve())
    token = open(path).read().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE((state / "tokens.json").stat().st_mode) == 0o600
    assert token not in (state / "tokens.json").read_text()
    second = _run(root, name, "token", "--state", str(state))
    assert second.stdout.strip() == path and open(path).read().strip() == token
    other = _run(root, name, "token", "--state", str(state), "--name", "ci")
    assert other.stdout.strip().endswith("client-token.ci")


def test_cli_usage_errors(tiny_ecosystem):
    root, name = tiny_ecosystem
    assert _run(root, name).returncode == 2
    assert _run(root, name, "serve").returncode == 2  # --state is required
    bad = _run(root, name, "token", "--state", "/tmp/x-kernel-test", "--name", "bad name")
    assert bad.returncode == 2 and "token names" in bad.stderr


def test_a_build_without_the_deployment_packs_says_how_to_get_them(tmp_path):
    """The Redis bus, tracing and eMADs are packs: an ecosystem whose spec names neither and has no role has none
    of their code, and asking for a Redis bus (serve, its options, bus status|forget|send) or for traces (an OTLP endpoint, by flag or by
    OTEL_ variable) is a clear error naming the spec change, not an ImportError; with neither asked for, it
    serves, and a MAD asking for earlier reports is told there are no roles."""
    from conftest import build_ecosystem

    pkg = build_ecosystem(tmp_path, "core_only_eco")
    shutil.rmtree(pkg / "kernel" / "packs" / "redis")
    shutil.rmtree(pkg / "kernel" / "packs" / "tracing")
    shutil.rmtree(pkg / "kernel" / "packs" / "emads")
    shutil.rmtree(pkg / "kernel" / "packs" / "postgres")
    state = str(tmp_path / "state")
    redis = ["--bus", "redis://127.0.0.1:9/0"]
    for args, said in ((["bus", "status", *redis], "built without the Redis bus"),
                       (["bus", "forget", *redis, "deadhost:1:x"], "built without the Redis bus"),
                       (["bus", "send", *redis, "--state", state, "--from", "rogers", "--to", "turing"],
                        "built without the Redis bus"),
                       (["serve", "--state", state, "--bus", "redis://127.0.0.1:9/0", "--port", "0"],
                        "built without the Redis bus"),
                       (["serve", "--state", state, "--drill-hold", "5", "--port", "0"], "built without the Redis bus"),
                       (["serve", "--state", state, "--claim-idle=5", "--port", "0"], "built without the Redis bus"),
                       (["serve", "--state", state, "--otlp-endpoint", "http://127.0.0.1:9", "--port", "0"],
                        "built without tracing"),
                       (["serve", "--state", state, "--db", "postgresql://regen@127.0.0.1:9/x", "--port", "0"],
                        "built without PostgreSQL state")):
        result = _run(tmp_path, "core_only_eco", *args)
        assert result.returncode != 0, args
        assert said in result.stderr and ": {}` under `packs:`" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    by_env = subprocess.run([sys.executable, "-m", "core_only_eco", "serve", "--state", state, "--port", "0"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert by_env.returncode != 0 and "built without tracing" in by_env.stderr, by_env.stderr
    # The database URL in the environment (as the RUNBOOK sets it) is refused the same way, by serve and the
    # commands that read it, before any state is written: never a silent fall back to a per-host SQLite file.
    env = dict(os.environ, PYTHONPATH=str(tmp_path), CORE_ONLY_ECO_DB_URL="postgresql://regen@127.0.0.1:9/x")
    fresh = tmp_path / "fresh-state"
    for args in (["serve", "--state", str(fresh), "--port", "0"], ["clients", "list", "--state", str(fresh)],
                 ["token", "--state", str(fresh)], ["audit", "verify", "--state", str(fresh)]):
        refused = subprocess.run([sys.executable, "-m", "core_only_eco", *args], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 2 and "built without PostgreSQL state" in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr
    assert not fresh.exists() or not any(fresh.iterdir()), sorted(fresh.iterdir())
    # Any endpoint, even a mistyped one, needs the pack first: checking it is the pack's (test_tracing.py).
    mistyped = _run(tmp_path, "core_only_eco", "serve", "--state", state, "--otlp-endpoint", "collector:4318",
                    "--port", "0")
    assert mistyped.returncode == 2 and "built without tracing" in mistyped.stderr, mistyped.stderr
    assert "Traceback" not in mistyped.stderr
    script = ("import asyncio, sys\n"
              "from core_only_eco.ecosystem import CONFIG\n"
              "from core_only_eco.kernel import gateway, tracing\n"
              "from core_only_eco.kernel.runtime import Runtime\n"
              "async def main():\n"
              "    runtime = Runtime(CONFIG, sys.argv[1])\n"
              "    await runtime.start()\n"
              "    assert tracing.start('x', {}) is tracing.OFF and runtime.transport.name == 'local'\n"
              "    await runtime.invoke_tool('rogers', 'create_conversation', {'title': 't'}, principal='client:ci')\n"
              "    assert (await runtime.invoke_tool('rogers', 'list_conversations', {}, principal='client:ci'))\n"
              "    try:\n"
              "        await runtime.mad('rogers').earlier_reports()\n"
              "    except Exception as exc:\n"
              "        assert 'this ecosystem has no roles' in str(exc), exc\n"
              "    else:\n"
              "        raise AssertionError('earlier_reports of a persistent MAD answered')\n"
              "    await runtime.stop()\n"
              "asyncio.run(main())\n"
              "assert not [m for m in sys.modules if m.startswith(('redis', 'opentelemetry.sdk', 'opentelemetry.exporter'))]\n")
    served = subprocess.run([sys.executable, "-c", script, state], env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 0, served.stderr


def test_an_ecosystem_with_roles_built_without_the_emads_pack_says_to_rebuild(tmp_path):
    from conftest import build_ecosystem

    pkg = build_ecosystem(tmp_path, "roles_eco")
    shutil.rmtree(pkg / "kernel" / "packs" / "emads")
    (pkg / "mads" / "__init__.py").write_text(
        (pkg / "mads" / "__init__.py").read_text().replace("MADS = (Turing, Rogers, Fiedler, Grace)", (
            "from ..kernel import Mad\n\n\nclass Scout(Mad):\n    name = 'scout'\n    role = 'a role'\n"
            "    lifecycle = 'ephemeral'\n\n\nMADS = (Turing, Rogers, Fiedler, Grace, Scout)")))
    result = _run(tmp_path, "roles_eco", "serve", "--state", str(tmp_path / "state"), "--port", "0")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "has roles (scout) but was built without the emads pack" in result.stderr, result.stderr


def test_an_ecosystem_whose_mad_owns_a_pack_the_build_lacks_is_refused_at_start(tmp_path):
    """A lone or pruned copy without a pack folder a MAD needs: refused at start, saying so and how to get it,
    not started with every call to the pack refused as if the MAD did not own it."""
    from conftest import build_ecosystem

    pkg = build_ecosystem(tmp_path, "pruned_eco")
    for pack in ("files", "data", "charts", "documents"):  # the pack, and those that require it
        shutil.rmtree(pkg / "kernel" / "packs" / pack)
    mads = pkg / "mads" / "__init__.py"
    mads.write_text(mads.read_text().replace("MADS = (Turing, Rogers, Fiedler, Grace)",
                                             "Rogers.owns = (*Rogers.owns, 'files')\nMADS = (Turing, Rogers, Fiedler, Grace)"))
    result = _run(tmp_path, "pruned_eco", "serve", "--state", str(tmp_path / "state"), "--port", "0")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "the 'files' capability pack is not in this build" in result.stderr, result.stderr
    assert "nox -s regenerate" in result.stderr


def _surface(parser: argparse.ArgumentParser) -> set[str]:
    """Every `<command>`, `<command> <subcommand>` and `<command> --option` a parser takes."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = set()
    for name, command in commands.choices.items():
        found.add(name)
        for action in command._actions:
            subcommands = action.choices if isinstance(action, argparse._SubParsersAction) else {}
            found |= {f"{name} {s}" for s in subcommands} | {f"{name} {o}" for o in action.option_strings if o[:2] == "--"}
    return found


@pytest.mark.parametrize("pack", ["redis", "console", "tracing", "postgres", "storage"])
def test_pack_parts_names_exactly_what_each_pack_adds_to_the_command_line(eco_modules, monkeypatch, pack):
    """A part a pack adds that PACK_PARTS does not name would meet argparse's "unrecognized arguments" in a build
    without the pack, instead of the line to add to the spec; one it names but no longer adds would be refused."""
    config, kernel, _ = eco_modules
    cli = importlib.import_module(f"{kernel.__name__}.cli")
    catalogue = importlib.import_module(f"{kernel.__name__}.capabilities")
    assert set(cli.PACK_PARTS) == {"redis", "console", "tracing", "postgres", "storage"}
    with_pack = _surface(cli._parser(config))
    monkeypatch.setattr(catalogue, "PACKS", {name: info for name, info in catalogue.PACKS.items() if name != pack})
    added = with_pack - _surface(cli._parser(config))
    parts = set(cli.PACK_PARTS[pack][0])
    assert {p for p in added if p in parts or p.split(" ")[0] not in parts} == parts  # a whole command, with its own
