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
    # Which tool serves each kernel capability: Grace shows a client the conversations only if it may call them.
    capability_tools={
        'conversations.create': 'rogers.create_conversation',
        'conversations.history': 'rogers.history',
        'conversations.list': 'rogers.list_conversations',
        'conversations.post': 'rogers.post',
        'conversations.search': 'rogers.search',
        'ecosystem.mads': 'grace.list_mads',
        'ecosystem.status': 'grace.status',
        'models.budget': 'fiedler.budget',
        'models.list': 'fiedler.list_models',
        'models.send': 'fiedler.send',
        'secrets.audit': 'turing.audit',
        'secrets.get': 'turing.get_secret',
        'secrets.list': 'turing.list_secrets',
        'secrets.rotate': 'turing.rotate_secret',
        'secrets.rotate_key': 'turing.rotate',
        'secrets.set': 'turing.set_secret',
    },
)
