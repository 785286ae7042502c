"""Run `regen` and SIGKILL it from inside at a chosen moment, so the moment is hit on every run.

Polling from outside raced the build: between `tests.json` and the rename into place there are only
milliseconds, and a fast machine finished first. An audit hook sees every file open, rename and
subprocess start, so the kill lands at the first such step after the moment, whatever the speed.

    python tests/kill_at.py MOMENT [--sandbox-result TESTS_JSON] -- regen-arguments...

MOMENT is
  a path inside the staging folder  the kill follows its creation;
  published                         the kill follows the rename of the staging folder into its version;
  emit:N[,M,...]                    the kill comes at the N-th file step (open, rename, ...) after the
                                    transcript is opened, i.e. somewhere while the artifact is written;
                                    with several, each runs in a child forked after the imports (litellm
                                    takes seconds to import), `{n}` in the arguments becomes N, and a JSON
                                    object {N: exit status} is printed (-9: killed);
  emit:count                        no kill: the number of such steps is printed to stderr at exit.
--sandbox-result stands in for the sandbox with recorded results, so a test can build many times fast; with
several emit moments, the artifact holding it also warms the static review's parse cache before the forks.
"""

import atexit
import os
import signal
import sys
from pathlib import Path

_WATCHED = {"open", "os.rename", "os.replace", "subprocess.Popen", "shutil.copyfile", "os.chmod"}


def _install(moment: str, out: Path) -> None:
    renamed = False
    emitting = False
    steps = 0
    kill_at = int(moment.split(":")[1]) if moment.startswith("emit:") and moment != "emit:count" else None

    def hook(event: str, args: tuple) -> None:
        nonlocal renamed, emitting, steps
        if event not in _WATCHED:
            return
        if moment.startswith("emit:"):
            path = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
            if not emitting and event == "open" and path.endswith("transcript.jsonl") and ".staging-" in path:
                emitting = True
            if emitting:
                steps += 1
                if steps == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return
        if renamed or (moment != "published" and any(out.glob(f"*/.staging-*/{moment}"))):
            os.kill(os.getpid(), signal.SIGKILL)
        if moment == "published" and event in {"os.rename", "os.replace"} \
                and Path(os.fsdecode(args[0])).name.startswith(".staging-"):
            renamed = True

    if moment == "emit:count":
        atexit.register(lambda: print(f"emit steps: {steps}", file=sys.stderr))
    sys.addaudithook(hook)


def recorded_sandbox(tests_json: Path):
    """A sandbox that answers with a recorded run's results (an artifact's tests.json), for tests about
    something else than the sandbox."""
    from generator.sandbox.run import SandboxResult

    result = SandboxResult.model_validate_json(tests_json.read_text())
    return lambda *args, **kwargs: result


def _each_in_a_fork(steps: list[str], argv: list[str], warm: Path | None) -> None:
    import json

    from generator.cli import main as regen
    from generator.senior.client import load_litellm

    load_litellm()
    if warm is not None:
        _warm_static_review(warm)
    statuses = {}
    for n in steps:
        args = [a.replace("{n}", n) for a in argv]
        pid = os.fork()
        if pid == 0:
            _install(f"emit:{n}", Path(args[args.index("--out") + 1]))
            os._exit(regen(args))
        _, status = os.waitpid(pid, 0)
        statuses[n] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print(json.dumps(statuses))


def _warm_static_review(artifact: Path) -> None:
    """Read an earlier artifact's Python files as the static review does, so each fork finds the kernel's files,
    the same bytes, read already (in memory, not only in the disk cache): the forks then pay for the build's own
    files, as a long-lived process would, not for 10,000 lines of kernel each time."""
    from generator.review import deterministic

    for path in deterministic._python_files(artifact):
        try:
            deterministic._facts((artifact / path).read_text(encoding="utf-8"), path)
        except (ValueError, SyntaxError):
            continue


def main() -> None:
    moment, *rest = sys.argv[1:]
    separator = rest.index("--")
    options, argv = rest[:separator], rest[separator + 1:]
    recorded = Path(options[1]) if options[:1] == ["--sandbox-result"] else None
    if recorded is not None:
        from generator.sandbox import run

        run.run_tests = recorded_sandbox(recorded)
    if moment.startswith("emit:") and "," in moment:
        _each_in_a_fork(moment.removeprefix("emit:").split(","), argv, recorded.parent if recorded else None)
        return
    _install(moment, Path(argv[argv.index("--out") + 1]))
    from generator.cli import main as regen

    sys.exit(regen(argv))


if __name__ == "__main__":
    main()
