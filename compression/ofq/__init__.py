"""OFQ (Liu et al. 2023): quantization-aware training of vision transformers without weight oscillation;
``experiment.py`` is ``gdpo ofq`` (OFQ against the LSQ baseline on a small ViT)."""
