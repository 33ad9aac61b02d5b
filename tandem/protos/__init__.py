"""tandem.v1, the public gRPC API: the .proto and its generated modules (committed)."""
