"""Run `regen` and SIGKILL it from inside at a chosen moment, so the moment is hit on every run.

Polling from outside raced the build: between `tests.json` and the rename into place there are only
milliseconds, and a fast machine finished first. An audit hook sees every file open, rename and
subprocess start, so the kill lands at the first such step after the moment, whatever the speed.

    python tests/kill_at.py MOMENT -- regen-arguments...

MOMENT is a path inside the staging folder (the kill follows its creation) or `published`
(the kill follows the rename of the staging folder into its version).
"""

import os
import signal
import sys
from pathlib import Path

_WATCHED = {"open", "os.rename", "os.replace", "subprocess.Popen", "shutil.copyfile"}


def _install(moment: str, out: Path) -> None:
    renamed = False

    def hook(event: str, args: tuple) -> None:
        nonlocal renamed
        if event not in _WATCHED:
            return
        if renamed or (moment != "published" and any(out.glob(f"*/.staging-*/{moment}"))):
            os.kill(os.getpid(), signal.SIGKILL)
        if moment == "published" and event in {"os.rename", "os.replace"} and Path(os.fsdecode(args[0])).name.startswith(".staging-"):
            renamed = True

    sys.addaudithook(hook)


def main() -> None:
    moment, separator, *argv = sys.argv[1:]
    assert separator == "--", __doc__
    out = Path(argv[argv.index("--out") + 1])
    _install(moment, out)
    from generator.cli import main as regen

    sys.exit(regen(argv))


if __name__ == "__main__":
    main()
