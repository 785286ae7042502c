"""The senior: every request to the model that writes the ecosystem, and every check of its answers.

models      ModelRequest, ModelReply, Exchange, and ModelClient, the seam a test swaps
client      the real client: litellm, retries, fallbacks, prices, keys
cache       the response cache: an unchanged request costs nothing
transcript  transcript.jsonl, written and read; a recorded build as the model (replay)
answer      the one answer shape, parsed and validated
check       checks before disk: paths, Python, tool signatures, principle rules
context     token counts against the senior's context window
synthesise  stage 3: one conversation per unit, budgets, repairs
carry       tool contracts; model-written tools carried from archived builds (offline)
scripted    an OpenAI-compatible server on 127.0.0.1 for tests and demos
offline/    `offline/reference`: the template synthesiser (a litellm provider), and written tools
prompts/    the senior's prompts (jinja2)
"""
