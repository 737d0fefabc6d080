"""The toy world: a procedural renderer, a readout and a benchmark where consistency is a number."""
