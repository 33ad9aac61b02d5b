"""tandem: speculative decoding serving. This package is the light client SDK and the CLI;
it imports neither torch nor ray (the server side lives in actors/, cluster/, kernels/)."""

__version__ = "0.1.0"
