"""Post-training compression of the trained policy (LLM-FP4, EoRA, pruning) and OFQ for ViTs.
Pure torch; never imports ray, vllm or deepspeed."""
