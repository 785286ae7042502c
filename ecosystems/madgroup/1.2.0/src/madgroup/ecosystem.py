"""How madgroup is wired: its MADs, its model aliases, its client budget."""

from .kernel import EcosystemConfig, ModelAlias
from .mads import MADS

CONFIG = EcosystemConfig(
    name='madgroup',
    description="The V1 MAD Group: Rogers carries every conversation, Fiedler routes model calls within per-MAD budgets, Turing keeps secrets encrypted with an audit trail, Horace keeps the ecosystem's files in one root, and Grace is the one door for people (web UI) and for MCP clients (gateway).",
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
        'files.delete': 'horace.delete_file',
        'files.list': 'horace.list_files',
        'files.move': 'horace.move_file',
        'files.read': 'horace.read_file',
        'files.stat': 'horace.stat_file',
        'files.write': 'horace.write_file',
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
    # What MCP clients are told of each tool bound to a capability: read-only, destructive, idempotent.
    tool_hints={
        'horace.write_file': {'readOnlyHint': False, 'destructiveHint': True, 'idempotentHint': True},
        'horace.read_file': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'horace.list_files': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'horace.stat_file': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'horace.move_file': {'readOnlyHint': False, 'destructiveHint': False, 'idempotentHint': False},
        'horace.delete_file': {'readOnlyHint': False, 'destructiveHint': True, 'idempotentHint': False},
        'turing.set_secret': {'readOnlyHint': False, 'destructiveHint': False, 'idempotentHint': True},
        'turing.get_secret': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'turing.list_secrets': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'turing.rotate_secret': {'readOnlyHint': False, 'destructiveHint': False, 'idempotentHint': False},
        'turing.rotate': {'readOnlyHint': False, 'destructiveHint': False, 'idempotentHint': False},
        'turing.audit': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'rogers.create_conversation': {'readOnlyHint': False, 'destructiveHint': False, 'idempotentHint': False},
        'rogers.post': {'readOnlyHint': False, 'destructiveHint': False, 'idempotentHint': False},
        'rogers.history': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'rogers.search': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'rogers.list_conversations': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'fiedler.list_models': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'fiedler.send': {'readOnlyHint': False, 'destructiveHint': False, 'idempotentHint': False},
        'fiedler.budget': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'grace.status': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
        'grace.list_mads': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True},
    },
)
