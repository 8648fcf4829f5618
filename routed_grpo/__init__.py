"""routed-grpo: gradient routing against reward hacking as a drop-in part of TRL's GRPOTrainer.

`from routed_grpo import RoutedGRPOConfig, RoutedGRPOTrainer` (imported lazily, so the sandbox and the CLI do not
pay for importing TRL).
"""

__version__ = "0.1.0"
__all__ = ["RoutedGRPOConfig", "RoutedGRPOTrainer"]


def __getattr__(name: str):
    if name == "RoutedGRPOConfig":
        from routed_grpo.config import RoutedGRPOConfig

        return RoutedGRPOConfig
    if name == "RoutedGRPOTrainer":
        from routed_grpo.trainer import RoutedGRPOTrainer

        return RoutedGRPOTrainer
    raise AttributeError(f"module 'routed_grpo' has no attribute {name!r}")
