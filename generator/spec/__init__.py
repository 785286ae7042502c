"""The spec: what a user writes, read and checked.

model    the typed spec (Spec, MadSpec, Tool, ...): immutable, unknown keys refused
load     a spec folder into a Spec, or every problem with file:line (stage 1)
requirements  requirements.md's requirements by id (R1., {#slug}), and what is wrong with them
plan     the MAD graph, start-up order and synthesis units (stage 2)
starter  `regen init`: a new spec to start from (templates/)
"""
