"""gdpo: distributed RL post-training (GDPO on DoRA adapters) for efficient reasoning."""

__version__ = "0.1.0"
