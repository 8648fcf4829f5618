"""Small helpers shared by the library, the lab and the sandbox: atomic files, progress bars, batches, tokenising.

- `atomic_write_text` / `atomic_write_bytes` / `atomic_path`: write through a temporary file in the same directory,
  then `os.replace`, so a crash or a bad input never leaves a partial file; the result gets the permissions any
  file created by the user would get (mode 0666 minus the umask), not `mkstemp`'s 0600.
- `progress_bar`: one tqdm bar (or None when off), the same look everywhere.
- `batched`: consecutive slices of a sequence.
- `encode_prompt` / `encode_rollout`: token ids of a chat prompt exactly as TRL's `GRPOTrainer` makes them
  (`apply_chat_template(..., add_generation_prompt=True, tokenize=True)`), and of a prompt plus a completion
  (completion tokenised on its own, EOS appended, as TRL's completion mask counts it).
- `quiet_known_noise`: hides warnings known to be harmless here (listed below with the reason), unless verbose.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def progress_bar(total: int, desc: str, on: bool = True, leave: bool = False, unit: str = "it"):
    """A tqdm progress bar, or None when `on` is False (callers guard `bar.update` with `if bar`). Written to a
    file or pipe (a log) it redraws every 30 s instead of many times a second."""
    if not on:
        return None
    import sys

    from tqdm.auto import tqdm

    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc=desc, leave=leave, unit=unit, dynamic_ncols=True, mininterval=interval)


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of `items` of length `size` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def encode_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt, as TRL's GRPOTrainer tokenises it (generation prompt appended)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def encode_rollout(tokenizer: Any, messages: list[dict], completion: str) -> tuple[list[int], int]:
    """Token ids of prompt + completion (+ EOS) and the number of prompt tokens."""
    prompt_ids = encode_prompt(tokenizer, messages)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    return [*prompt_ids, *completion_ids], len(prompt_ids)


# Messages known to be harmless on the machines the project runs on; shown only with ROUTED_GRPO_VERBOSE=1 (or
# the CLI's --verbose). Each entry: (logger name or warning message regex, why it is harmless).
KNOWN_NOISE_LOGGERS = {
    "bitsandbytes.backends.cpu.ops": "CPU 4-bit kernel notice: the `kernels` package is absent, bitsandbytes uses its "
    "own CPU path",
}
KNOWN_NOISE_WARNINGS = {
    r"`(is_)?gradient_checkpointing\w*` is deprecated": "transformers 5 renames gradient checkpointing; TRL 1.16 "
    "still calls the old names",
}


def quiet_known_noise(verbose: bool = False) -> None:
    """Hide the known-harmless warnings above and transformers' weight-loading bars, unless `verbose` (or the
    environment variable ROUTED_GRPO_VERBOSE=1). Called by the command line and `recipes/train.py`, never at import."""
    import logging
    import warnings

    if verbose or os.environ.get("ROUTED_GRPO_VERBOSE") == "1":
        return
    for name in KNOWN_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in KNOWN_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
