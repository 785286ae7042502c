from .ecosystem import CONFIG
from .kernel.cli import main

raise SystemExit(main(CONFIG))
