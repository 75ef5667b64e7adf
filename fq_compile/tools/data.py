"""Evaluation and calibration text: WikiText-2, read from a data directory or the hub.

The data directory is, in order: the argument, $FQ_DATA_DIR, `../shared/data` beside the working
directory or beside this checkout, else the hub (the `datasets` package, for online users).
Calibration uses the validation split; the test split is for perplexity only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TEST_FILE = Path("wikitext-2-raw") / "wiki.test.raw"
CALIB_FILE = Path("wikitext-2") / "valid.txt"


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    if data_dir is not None:
        p = Path(data_dir)
        if not p.is_dir():
            raise FileNotFoundError(f"data directory {p} does not exist")
        return p
    if os.environ.get("FQ_DATA_DIR"):
        return find_data_dir(os.environ["FQ_DATA_DIR"])
    for cand in (Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def _hub_split(split: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError:
        raise FileNotFoundError("no local data directory (pass --data-dir or set FQ_DATA_DIR) and the `datasets` "
                                "package for the hub fallback is not installed") from None
    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    return "".join(rows)


def _read(data_dir, relpath: Path, hub_split: str) -> str:
    d = find_data_dir(data_dir)
    if d is None:
        return _hub_split(hub_split)
    path = d / relpath
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the data directory")
    return path.read_text(encoding="utf-8")


def wikitext_test(data_dir=None) -> str:
    """The WikiText-2 raw test split as one string (rows concatenated, each keeping its newline)."""
    return _read(data_dir, TEST_FILE, "test")


def wikitext_calibration(data_dir=None) -> str:
    """The WikiText-2 validation split (calibration only; never the test split)."""
    return _read(data_dir, CALIB_FILE, "validation")


def random_windows(token_ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> list[torch.Tensor]:
    """n windows of seqlen tokens at seeded random offsets, each a [1, seqlen] batch."""
    return [token_ids[s:s + seqlen].unsqueeze(0) for s in _window_starts(token_ids.numel(), n, seqlen, seed)]


def _window_starts(numel: int, n: int, seqlen: int, seed: int) -> list[int]:
    if numel <= seqlen:
        raise ValueError(f"calibration text has {numel} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, numel - seqlen, (n,), generator=g).tolist()


def calibration_batches(tokenizer, n: int = 16, seqlen: int = 512, seed: int = 0, data_dir=None) -> list[torch.Tensor]:
    ids = tokenizer(wikitext_calibration(data_dir), return_tensors="pt").input_ids[0]
    return random_windows(ids, n, seqlen, seed)


def heldout_windows(token_ids: torch.Tensor, n: int, seqlen: int, calib_n: int, calib_seqlen: int,
                    seed: int = 0) -> torch.Tensor:
    """n windows of seqlen validation tokens that overlap none of the calibration windows
    (random_windows(token_ids, calib_n, calib_seqlen, seed)), as one 1-D tensor of n * seqlen tokens.

    Settings are chosen on these (never on the test split) and calibrated on the others, so a choice
    that only fits the calibration text does not look good.  The validation text is cut into
    consecutive windows; those free of calibration tokens are drawn with a generator seeded apart
    from the calibration one."""
    used = torch.zeros(token_ids.numel(), dtype=torch.bool)
    for s in _window_starts(token_ids.numel(), calib_n, calib_seqlen, seed):
        used[s:s + calib_seqlen] = True
    nwin = token_ids.numel() // seqlen
    free = [i for i in range(nwin) if not bool(used[i * seqlen:(i + 1) * seqlen].any())]
    if len(free) < n:
        raise ValueError(f"only {len(free)} validation windows of {seqlen} tokens avoid the calibration windows; "
                         f"{n} were asked for")
    pick = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed + 1_000_003))[:n]
    return torch.cat([token_ids[free[i] * seqlen:(free[i] + 1) * seqlen] for i in sorted(pick.tolist())])


def selection_tokens(tokenizer, n: int = 4, seqlen: int = 2048, calib_n: int = 16, calib_seqlen: int = 512,
                     seed: int = 0, data_dir=None) -> torch.Tensor:
    """The held-out validation tokens for choosing settings (see heldout_windows)."""
    ids = tokenizer(wikitext_calibration(data_dir), return_tensors="pt").input_ids[0]
    return heldout_windows(ids, n, seqlen, calib_n, calib_seqlen, seed)
