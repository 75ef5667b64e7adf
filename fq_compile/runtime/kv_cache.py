"""An 8-bit KV cache: transformers' DynamicCache and StaticCache whose attention layers keep K and V
in INT8 or FP8 e4m3 with the plan's calibrated static scales (Config.attention).

    plan = fq_compile.calibrate(model, batches, fq_compile.Config(level="O1", attention="int8"))
    model.compile(backend="flattenquant", options={"plan": plan})
    cache = fq_compile.kv_cache(plan, model)                  # or kind="static", max_cache_len=...
    out = model.generate(ids, past_key_values=cache, max_new_tokens=...)
    fq_compile.kv_cache_bytes(cache)                          # K/V bytes held: half of fp16

Each layer quantizes the new keys and values with `fq.quantize_heads` (the op and scales the attention
rewrite uses, so a token's 8-bit K is the same whether it comes from the cache or from this step) and
returns `fq.dequantize_heads` of everything cached.  Whatever reads that as floats (an un-compiled
model, attention="fp") works unchanged; under the flattenquant backend the attention rewrite sees the
dequantize and hands the 8-bit tensor itself to fq::attention (passes/attention.py), so decode streams
one byte per element.  Layers the plan does not quantize (sliding windows, ...) stay transformers' own.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache, StaticLayer

from fq_compile.kernels.attention import FORMATS, inverse_scale
from fq_compile.plan import QuantPlan


class _Quantizer:
    """The per-layer scales and formats, moved to the states' device on first use."""

    def __init__(self, k_scale: torch.Tensor, v_scale: torch.Tensor, k_dtype: torch.dtype, v_dtype: torch.dtype):
        self.k_scale, self.v_scale = k_scale.detach().float().clone(), v_scale.detach().float().clone()
        self.k_inv, self.v_inv = inverse_scale(self.k_scale), inverse_scale(self.v_scale)
        self.k_dtype, self.v_dtype = k_dtype, v_dtype
        self.dtype: torch.dtype | None = None

    def prepare(self, key_states: torch.Tensor) -> None:
        self.dtype = key_states.dtype
        dev = key_states.device
        self.k_scale, self.v_scale = self.k_scale.to(dev), self.v_scale.to(dev)
        self.k_inv, self.v_inv = self.k_inv.to(dev), self.v_inv.to(dev)

    def quantize(self, key_states, value_states):
        return (torch.ops.fq.quantize_heads(key_states, self.k_inv, self.k_dtype),
                torch.ops.fq.quantize_heads(value_states, self.v_inv, self.v_dtype))

    def dequantize(self, keys, values):
        return (torch.ops.fq.dequantize_heads(keys, self.k_scale, self.dtype),
                torch.ops.fq.dequantize_heads(values, self.v_scale, self.dtype))


class QuantizedDynamicLayer(DynamicLayer):
    """DynamicLayer storing 8-bit K/V (transformers' concatenation, on the quantized states)."""

    def __init__(self, quantizer: _Quantizer):
        super().__init__()
        self.fq = quantizer

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.fq.prepare(key_states)
        keys, values = super().update(*self.fq.quantize(key_states, value_states), *args, **kwargs)
        return self.fq.dequantize(keys, values)


class QuantizedStaticLayer(StaticLayer):
    """StaticLayer whose preallocated buffers are 8-bit, written in place like transformers' own
    (index_copy_; float8 has no index_copy_ kernel, so it takes transformers' fallback, an index_put_)."""

    def __init__(self, max_cache_len: int, quantizer: _Quantizer):
        super().__init__(max_cache_len=max_cache_len)
        self.fq = quantizer

    def lazy_initialization(self, key_states, value_states):
        self.fq.prepare(key_states)
        # StaticLayer allocates in the states' dtype: hand it empty 8-bit states of the same shape
        super().lazy_initialization(key_states[:, :, :0].to(self.fq.k_dtype),
                                    value_states[:, :, :0].to(self.fq.v_dtype))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kq, vq = self.fq.quantize(key_states, value_states)
        n = key_states.shape[-2]
        pos = torch.arange(n, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(n)
        for buf, new in ((self.keys, kq), (self.values, vq)):
            if buf.dtype == torch.int8:
                buf.index_copy_(2, pos, new)
            else:
                buf[:, :, pos] = new
        return self.fq.dequantize(self.keys, self.values)


def _quantizers(plan: QuantPlan) -> dict[int, _Quantizer]:
    out = {}
    for name, ap in plan.attention.items():
        if ap.layer_idx is None:
            raise ValueError(f"attention {name} has no cache layer index in the plan (its module has no layer_idx)")
        out[int(ap.layer_idx)] = _Quantizer(ap.k_scale, ap.v_scale, FORMATS[ap.qk_format], FORMATS[ap.pv_format])
    if not out:
        raise ValueError("the plan quantizes no attention: calibrate with Config(attention='int8' or 'fp8') for an "
                         "8-bit KV cache")
    return out


class FQDynamicCache(DynamicCache):
    """transformers' DynamicCache with 8-bit K/V in the layers the plan quantizes."""

    def __init__(self, plan: QuantPlan, config, **kwargs):
        super().__init__(config=config, **kwargs)
        for idx, qz in _quantizers(plan).items():
            if idx >= len(self.layers) or type(self.layers[idx]) is not DynamicLayer:
                continue                       # sliding-window layers keep transformers' own class
            self.layers[idx] = QuantizedDynamicLayer(qz)


class FQStaticCache(StaticCache):
    """transformers' StaticCache with 8-bit K/V buffers in the layers the plan quantizes."""

    def __init__(self, plan: QuantPlan, config, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        for idx, qz in _quantizers(plan).items():
            if idx >= len(self.layers) or type(self.layers[idx]) is not StaticLayer:
                continue
            self.layers[idx] = QuantizedStaticLayer(max_cache_len, qz)


def kv_cache(plan: QuantPlan, model, kind: str = "dynamic", max_cache_len: int | None = None, **kwargs):
    """An 8-bit KV cache for `model` (pass it to generate() as past_key_values).  kind: "dynamic"
    (grows by concatenation) or "static" (preallocated for max_cache_len tokens, for compiled decode)."""
    config = getattr(model, "config", model)
    if kind == "dynamic":
        return FQDynamicCache(plan, config, **kwargs)
    if kind == "static":
        if not max_cache_len:
            raise ValueError("kv_cache(kind='static') needs max_cache_len (prompt + new tokens)")
        return FQStaticCache(plan, config, max_cache_len, **kwargs)
    raise ValueError(f"kv_cache: kind must be 'dynamic' or 'static', got {kind!r}")


def kv_cache_bytes(cache) -> int:
    """Bytes of K and V held by any transformers cache (scales and counters not counted)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
