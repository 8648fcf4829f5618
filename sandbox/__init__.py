"""The loophole environment: problems, prompts, a hardened executor, rewards and measurement labels."""
