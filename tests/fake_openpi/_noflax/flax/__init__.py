"""Stand-in for flax (tests only): just ``nnx.split`` / ``nnx.merge`` for the stand-in π₀ model."""
