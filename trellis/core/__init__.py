"""Floor 1, the core: pure types and rules (requests, step plans, the engine configuration, the
deploy spec, model configs and presets, hashing, errors, logging). No torch, grpc or protobuf."""
