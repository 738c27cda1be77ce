"""The real executor: the model over a paged KV pool (runner, sampler, KV cache) and the factory that builds it."""
