"""The MADs of madgroup, in start-up order (dependencies first)."""

from .fiedler import Fiedler
from .grace import Grace
from .horace import Horace
from .rogers import Rogers
from .turing import Turing

MADS = (Horace, Turing, Rogers, Fiedler, Grace)
