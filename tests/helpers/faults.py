"""Reward plugins that crash their worker process once (for fault-tolerance tests)."""

import os


def die_once(prompts, completions, marker: str = "", **fields):
    """Kills its own process the first time it runs (marker file absent), then scores 0."""
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return [0.0 for _ in completions]
