"""How madgroup is wired: its MADs, its model aliases, its client budget."""

from .kernel import EcosystemConfig, ModelAlias
from .mads import MADS

CONFIG = EcosystemConfig(
    name='madgroup',
    description='The V1 MAD Group: Rogers carries every conversation, Fiedler routes model calls within per-MAD budgets, Turing keeps secrets encrypted with an audit trail, and Grace is the one door for people (web UI) and for MCP clients (gateway).',
    models={
        'default': ModelAlias(
            provider='echo',
            model='',
            api_base='',
            api_key_secret='',
        ),
    },
    client_budget_tokens=200000,
    mads=MADS,
)
