"""The kernel's error family. Every refusal a caller can see is a `KernelError` with a clear message.

Messages never carry secret values: they name the secret, the caller and the rule, nothing more.
"""

from __future__ import annotations


class KernelError(Exception):
    """Base class: a request the kernel refuses or cannot satisfy. Safe to show to the caller."""

    code = "error"


class AccessDenied(KernelError):
    """The caller is not allowed to do this (secrets ACL, tool patterns, talks_to)."""

    code = "access_denied"


class NotFound(KernelError):
    """A named thing (conversation, secret, MAD, tool, model alias) does not exist."""

    code = "not_found"


class InvalidArgument(KernelError):
    """An argument is malformed or out of range."""

    code = "invalid_argument"


class BudgetExceeded(KernelError):
    """A model call would exceed the caller's token budget."""

    code = "budget_exceeded"


class ModelError(KernelError):
    """A model provider failed (HTTP error, malformed answer, missing key)."""

    code = "model_error"


class DurabilityError(KernelError):
    """An fdatasync of the database's log failed: what was written since cannot be acknowledged."""

    code = "not_durable"
