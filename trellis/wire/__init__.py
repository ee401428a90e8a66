"""Floor 2, the wire: the only library code that touches the generated protobuf (`trellis.v1`):
codecs, the gRPC server builder, typed clients."""
