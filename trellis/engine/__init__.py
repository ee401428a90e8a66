"""Floor 4, the offline engine: one replica (TP x PP) on this host, driven from Python."""

from trellis.engine.offline import Completion, Engine, EngineArgs, EngineError

__all__ = ["Completion", "Engine", "EngineArgs", "EngineError"]
