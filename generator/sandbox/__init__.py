"""The sandbox: the generated ecosystem's own tests, fenced off from the network (stage 4).

run      a venv from the artifact's lock, bubblewrap (or `unshare -n`), limits, junit results
upgrade  the upgrade test: the parent writes state, the new version reads it back
probe    the two halves of the upgrade test, run by each version's own interpreter
"""
