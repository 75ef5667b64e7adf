"""Perplexity by the GPTQ/SmoothQuant protocol: the whole text tokenized once, non-overlapping
windows of `seqlen` tokens, mean NLL over every predicted token of every window."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Perplexity:
    ppl: float
    windows: int
    tokens: int
    seqlen: int
    limited: bool     # True when max_tokens cut the text short

    def __str__(self):
        note = " (limited run: not the full test set)" if self.limited else ""
        return f"{self.ppl:.3f} over {self.windows} windows of {self.seqlen} tokens{note}"


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = 2048, max_tokens: int | None = None,
               progress: bool = True, device=None) -> Perplexity:
    ids = token_ids.reshape(-1)
    limited = max_tokens is not None and max_tokens < ids.numel()
    if limited:
        ids = ids[:max_tokens]
    nwin = ids.numel() // seqlen
    if nwin == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of {seqlen}")
    nll, count = 0.0, 0
    for i in tqdm(range(nwin), desc="perplexity", disable=not progress):
        x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
        if device is not None:
            x = x.to(device)
        logits = model(x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += float(loss)
        count += seqlen - 1
    return Perplexity(math.exp(nll / count), nwin, nwin * seqlen, seqlen, limited)
