"""`routed-grpo` commands of the lab: organism, experiment (eval, compare), demo and study."""
