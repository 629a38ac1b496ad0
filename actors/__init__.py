"""Ray actors (rollout, rewards, learner, weight sync, cluster). Thin: each remote method calls one
library function. The distributed trainer lands with the distributed-training issue."""
