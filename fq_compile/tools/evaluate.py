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
               progress: bool = True, device=None, on_window=None) -> Perplexity:
    """Perplexity of `model` (the module or a compiled one) over `token_ids`; on_window(i, logits), when
    given, sees each window's logits [1, seqlen, vocab] (e.g. to compare two models without a second pass)."""
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
        logits = model(x, use_cache=False).logits.float()
        if on_window is not None:
            on_window(i, logits)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += float(loss)
        count += seqlen - 1
    return Perplexity(math.exp(nll / count), nwin, nwin * seqlen, seqlen, limited)


def parse_overrides(items) -> dict:
    """["beta=1.1", "smoothing=none", "flatten_weights=true"] -> Config keyword arguments.

    Values are read as JSON where they parse (numbers, true/false, lists), else kept as strings,
    so the command line and the benchmark name a configuration the same way."""
    import json

    from fq_compile.config import ConfigError

    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"a Config override must read KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def plan_summary(plan) -> dict:
    """A plan's figures for the tables: INT4 share of the quantized layers (int4 + w4a8) and of their
    weights, average flatten ratio of the flattened layers, weight bytes (quantized and fp16), and the
    layer count per format."""
    layers = list(plan.layers.values())
    n = len(layers)
    if n == 0:
        return dict(int4=0.0, int4_weights=0.0, flatten=0.0, layers=0, weight_bytes=0, fp16_bytes=0, formats={})
    params = sum(lp.in_features * lp.out_features for lp in layers)
    flat = [plan.groups[lp.group].flatten_ratio for lp in layers if lp.flattened]
    formats = {}
    for lp in layers:
        formats[lp.format] = formats.get(lp.format, 0) + 1
    return dict(int4=sum(lp.bits == 4 for lp in layers) / n,
                int4_weights=sum(lp.in_features * lp.out_features for lp in layers if lp.bits == 4) / params,
                flatten=sum(flat) / len(flat) if flat else 0.0, layers=n,
                weight_bytes=sum(lp.weight_bytes for lp in layers), fp16_bytes=2 * params, formats=formats)


def compile_quantized(model: torch.nn.Module, plan, inductor: bool | None = None, **options):
    """`torch.compile(model, backend="flattenquant", options={"plan": plan, ...})` as the tools run it.

    inductor=None (the tools' default) compiles the float ops around the fq:: ops with Inductor on a
    GPU and not on the CPU.  On the CPU the time is in the fq:: ops and the float GEMMs, which Inductor
    calls as they are; what it fuses around them saves a few percent of a forward, while compiling it
    costs a minute or more of C++ per graph on a small machine (benchmarks/results/cpu-*.md).  Either
    way the fq:: ops, and so their integers, are the same."""
    if inductor is None:
        inductor = any(p.device.type != "cpu" for p in model.parameters())
    return torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": inductor, **options})


def evaluate_config(model, calib, token_ids, config, seqlen: int = 2048, max_tokens: int | None = None,
                    progress: bool = True, device=None, inductor: bool | None = None) -> dict:
    """Calibrate `config` on `calib`, compile with the flattenquant backend and measure perplexity:
    the one code path behind `fq-compile eval` and benchmarks/accuracy.py, so both give the same
    figure for the same model, data, windows and Config.  inductor: see `compile_quantized`.

    Each call adds two entries to the Dynamo cache of the model's forward (calibration's graph and the
    compiled one); a caller evaluating many configurations in one process raises Dynamo's recompile
    limit for that scope (as `fq-compile eval` does) or starts each from empty caches."""
    import time

    from fq_compile.planning.calibrate import calibrate

    t = time.time()
    plan = calibrate(model, calib, config, progress=progress)
    fast = compile_quantized(model, plan, inductor, free_weights=False)   # the next row calibrates it again
    res = perplexity(fast, token_ids, seqlen, max_tokens, progress=progress, device=device)
    return dict(ppl=res.ppl, windows=res.windows, **plan_summary(plan), seconds=time.time() - t,
                config=config.to_dict(), plan=plan, compiled=fast)
