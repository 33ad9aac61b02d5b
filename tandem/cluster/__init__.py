"""The Ray Serve application: config schema, app builder, the request front end (gRPC and
OpenAI-style HTTP), the Lane deployment and its metrics."""
