"""The speculative decoding algorithm, device-agnostic: request state, the modes (AR, SD, PEARL),
the step they share, the continuous batch, AdaEDL and the load controller."""
