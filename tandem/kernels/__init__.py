"""Device code: the sampling transform, rejection sampling, entropy, attention and layer ops;
each Triton kernel beside the pure-torch reference it is tested against."""
