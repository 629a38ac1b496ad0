1 / 0


def reward(prompts, completions, **fields):
    return [1.0 for _ in completions]
