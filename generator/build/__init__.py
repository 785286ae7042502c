"""The build: the compiler's stages chained, each a function with typed input and output.

context   BuildContext (what a run is given, and the seams of every outside effect), BuildResult
pipeline  `regenerate`: the stages on one screen
prepare   stages 1-2, nothing spent: load, up to date?, plan, requests, version, reuse, carried tools
produce   stages 3-5: synthesise, write src/, sandbox tests, repair
judge     stage 6: the review panel, repairs from its findings
archive   stage 7: the upgrade test, the artifact, its Manifest and signature, publish
reuse     units taken from the parent with the exchanges they came from
summary   the one screen a build ends with
verify    `regen verify`: check an artifact, and replay it on the same stages
"""
