"""What an artifact is, and what is done with one once it exists.

manifest   the Manifest model: the one way manifest.json is read and written
store      versions on disk, staging folders, publishing (complete or absent)
archived   an archived version as a later build draws on it (reuse, carried tools), checked first
lock       the build lock: per unit, what it was made from and what it made
sign       Ed25519 signature, provenance (in-toto / SLSA), integrity checks
sbom       the CycloneDX SBOM of the locked dependencies
surface    the tool surface and storage schema, and the version bump they call for
migrate    storage changes as numbered migrations
overrides  pinned overrides from the spec
history    `regen versions`, `regen diff`, and the file diff reviewers read
workcopy   `regen export` and `regen update` (3-way merge)
"""
