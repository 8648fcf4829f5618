"""Train one arm of the experiment from a recipe.

    accelerate launch --config_file accelerate_config.yaml recipes/train.py --config recipes/organism/routed.yaml

Parse (TRL's `TrlParser`: `ExperimentArguments`, `RoutedGRPOConfig`, `ModelConfig`), build, train, save; the
logic lives in `routed_grpo.lab.experiment`. Command-line flags override the recipe's keys (`--output_dir runs/x`).
"""

import sys

import torch

from routed_grpo.lab.experiment import parse_recipe, run_experiment
from routed_grpo.utils import quiet_known_noise


def main(argv: list[str] | None = None) -> int:
    quiet_known_noise()  # known-harmless warnings; ROUTED_GRPO_VERBOSE=1 shows them
    try:
        script, training, model_args = parse_recipe(argv)
    except ValueError as err:  # TRL's parser error names the unknown key; our checks name the field
        print(f"recipes/train.py: error: {err}", file=sys.stderr)
        return 2
    try:
        run_experiment(script, training, model_args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
