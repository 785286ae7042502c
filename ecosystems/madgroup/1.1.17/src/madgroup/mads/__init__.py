"""The MADs of madgroup, in start-up order (dependencies first)."""

from .fiedler import Fiedler
from .grace import Grace
from .rogers import Rogers
from .turing import Turing

MADS = (Turing, Rogers, Fiedler, Grace)
