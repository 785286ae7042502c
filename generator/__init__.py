"""regen, the ecosystem compiler: a spec of MADs in, a tested, archived ecosystem out."""

__version__ = "0.1.0"
