"""Core: value types, config, registries, hook specs, runtimes, KV pools, the pipeline and the engine."""
