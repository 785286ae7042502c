"""The MADs of madgroup, in start-up order (dependencies first)."""

from .developer import Developer
from .dewey import Dewey
from .fiedler import Fiedler
from .gates import Gates
from .grace import Grace
from .hopper import Hopper
from .horace import Horace
from .marco import Marco
from .mcnamara import Mcnamara
from .playfair import Playfair
from .pm import Pm
from .rogers import Rogers
from .stallman import Stallman
from .turing import Turing

MADS = (Developer, Dewey, Gates, Hopper, Horace, Marco, Mcnamara, Playfair, Pm, Stallman, Turing, Rogers, Fiedler, Grace)
