"""The review stage: a panel of reviewers judges a build and a consensus rule gates it.

models        findings, verdicts, the material reviewers see, the panel's report
panel         reviewer and panel definitions from reviews/ (TOML), consensus rules
deterministic the offline reviewers: sandbox tests, static checks, dependencies
llm           an LLM reviewer: prompts, chunking to its window, verdict parsing
run           rounds, concurrency, repair hand-off; `review()` is the stage
report        review.json, review.md and review.html
"""
