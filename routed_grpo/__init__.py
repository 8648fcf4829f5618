"""routed-grpo: gradient routing against reward hacking as a drop-in part of TRL's GRPOTrainer."""

__version__ = "0.1.0"
