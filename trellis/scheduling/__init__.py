"""Floor 2, scheduling: the head's scheduler and block manager, pure Python (no torch, no grpc)."""
