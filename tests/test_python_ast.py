"""regen parses Python in threads (units are synthesised, checked and reviewed concurrently): its parses never
trip CPython 3.11's shared AST-constructor depth counter (python/cpython#106905), which failed a CI run with
"SystemError: AST constructor recursion depth mismatch" inside kernel_contract.api_text."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Threads switched as often as possible, and a garbage collection with a Python finaliser inside nearly every
# parse: the moment at which another thread's parse changes the counter under this one.
RACE = textwrap.dedent(
    """
    import ast, gc, sys, threading
    from generator import python_ast

    sys.setswitchinterval(1e-6)
    gc.set_threshold(50, 1, 1)

    class Cycle:
        def __del__(self):
            sum(range(50))

    parse = python_ast.parse if sys.argv[1] == "regen" else ast.parse
    source = open("generator/kernel/db.py").read()
    errors = []

    def work():
        for _ in range(40):
            for _ in range(30):
                c = Cycle(); c.me = c
            try:
                parse(source)
            except SystemError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(len(errors))
    """
)


def _errors(which: str) -> int:
    done = subprocess.run([sys.executable, "-c", RACE, which], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_parses_in_many_threads_at_once_never_fail():
    assert _errors("regen") == 0
