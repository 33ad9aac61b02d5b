"""tandem: speculative decoding serving.

Importing `tandem` (and `tandem.client`, `tandem.cli`, `tandem.params`, `tandem.errors`,
`tandem.models`, `tandem.protos`) needs neither torch nor ray: that is the light SDK. The server
side is in the subpackages, imports flowing one way (docs/design.md):
cluster (Serve app) → actors (processes) → spec (the algorithm) → engine (models) → kernels.
"""

__version__ = "0.1.0"
