import sys

sys.exit(3)


def reward(prompts, completions, **fields):
    return [1.0 for _ in completions]
