"""Model engines: a causal LM with per-request KV slots and rollback (`base.Engine`), the native
Llama-family engine with CUDA graphs and tensor parallelism, and the transformers fallback."""
