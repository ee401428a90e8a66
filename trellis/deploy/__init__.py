"""Floor 6, deploy: the processes a spec implies (run on one host by `trellis up`), local specs,
the demo model."""
