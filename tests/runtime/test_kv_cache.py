"""runtime/kv_cache.py: transformers' dynamic and static caches holding 8-bit K/V.

The reference path is the same compiled quantized model with transformers' float DynamicCache: there
the attention rewrite quantizes the whole cached K/V every step, with the same op and scales, so the
8-bit caches must give the same greedy tokens and the very same logits; and the decode graphs must
read the 8-bit tensors directly (no dequantize + quantize round trip)."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import DynamicCache

import fq_compile
from fq_compile import Config
from fq_compile.runtime.kv_cache import QuantizedDynamicLayer, QuantizedStaticLayer
from fq_compile.runtime.state import reports
from tests.conftest import VOCAB, batches, run_guarded, tiny_llama, tiny_opt

GEN = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True,
           pad_token_id=0)


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@pytest.mark.parametrize("kind,fmt", [("llama", "int8"), ("llama", "fp8"), ("opt", "int8")])
def test_8bit_caches_give_the_reference_tokens_and_logits(kind, fmt):
    model = (tiny_llama if kind == "llama" else tiny_opt)(layers=2)
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="O1", attention=fmt), progress=False)
    torch._dynamo.reset()
    model.compile(backend="flattenquant", options={"plan": plan, "inductor": False})
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                                  # left padding: an explicit mask
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config), **GEN)
        dyn = fq_compile.kv_cache(plan, model)
        out_d = model.generate(ids, attention_mask=mask, past_key_values=dyn, **GEN)
        sta = fq_compile.kv_cache(plan, model, kind="static", max_cache_len=40)
        out_s = model.generate(ids, attention_mask=mask, past_key_values=sta, **GEN)
    for out in (out_d, out_s):
        assert torch.equal(out.sequences, ref.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
    assert all(isinstance(layer, QuantizedDynamicLayer) and layer.keys.dtype == dtype for layer in dyn.layers)
    assert all(isinstance(layer, QuantizedStaticLayer) and layer.values.dtype == dtype for layer in sta.layers)
    # K/V bytes: a quarter of the float32 cache here, i.e. half of an fp16 cache
    assert fq_compile.kv_cache_bytes(dyn) * 4 == fq_compile.kv_cache_bytes(ref.past_key_values) > 0
    # decode graphs hand the cached 8-bit tensors to fq.attention, with no quantize of the cache
    decode = [r.code for r in reports(plan) if "cache_layers_0_keys" in r.code and "fq.attention.default" in r.code]
    assert decode
    assert any("fq.attention.default(quantize_heads_default, l_kwargs_cache_layers_0_keys" in c or
               "fq.attention.default(quantize_heads_default, keys, values" in c for c in decode)


def test_uncompiled_model_reads_dequantized_values():
    """Without the backend the cache still works: attention reads fq.dequantize_heads' floats."""
    model = tiny_llama(layers=1)
    plan = fq_compile.calibrate(model, batches(n=2), Config(level="fp16", attention="int8"), progress=False)
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    errs = []
    with torch.no_grad():       # teacher-forced: prefill 6 tokens, then one token a step, same tokens for both
        caches = [DynamicCache(config=model.config), fq_compile.kv_cache(plan, model)]
        for t0, t1 in ((0, 6), (6, 7), (7, 8), (8, 9), (9, 10)):
            ref, out = (model(ids[:, t0:t1], past_key_values=c, use_cache=True).logits for c in caches)
            errs.append(float((out - ref).norm() / ref.norm()))
    assert 0 < max(errs) < 0.05, errs


def test_cache_errors_are_clear():
    model = tiny_llama(layers=1)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="O1"), progress=False)
    with pytest.raises(ValueError, match="quantizes no attention"):
        fq_compile.kv_cache(plan, model)
    plan = fq_compile.calibrate(model, batches(n=1), Config(level="fp16", attention="int8"), progress=False)
    with pytest.raises(ValueError, match="max_cache_len"):
        fq_compile.kv_cache(plan, model, kind="static")
    with pytest.raises(ValueError, match="'dynamic' or 'static'"):
        fq_compile.kv_cache(plan, model, kind="paged")


def _gpu_main(fmt: str):
    """On the GPU, through Inductor: the Triton attention kernel in the compiled code (no reference
    op), and the 8-bit caches give the float cache's tokens and logits."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_llama(layers=1).cuda().half()      # one block: the caches' numerics, at half the compile time
    plan = fq_compile.calibrate(model, [b.cuda() for b in batches(n=2)], Config(level="O1", attention=fmt),
                                progress=False)
    torch._dynamo.reset()
    model.compile(backend="flattenquant", options={"plan": plan})
    ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        print("generate: float cache (the reference path)", flush=True)
        ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **GEN)
        print("generate: 8-bit dynamic cache", flush=True)
        out_d, codes = run_and_get_code(lambda: model.generate(ids, past_key_values=fq_compile.kv_cache(plan, model),
                                                               **GEN))
        print("generate: 8-bit static cache", flush=True)
        out_s = model.generate(ids, past_key_values=fq_compile.kv_cache(plan, model, kind="static", max_cache_len=32),
                               **GEN)
    for out in (out_d, out_s):
        assert torch.equal(out.sequences, ref.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    code = "\n".join(codes)
    assert "attention_kernel" in code and "attention_reference" not in code
    print(f"kv cache gpu {fmt}: ok")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_gpu_generate_with_8bit_cache_through_inductor(fmt):
    """_gpu_main in a child process under a time limit (a hung kernel or compile fails the test)."""
    run_guarded([__file__, fmt], 300)


if __name__ == "__main__":
    _gpu_main(sys.argv[1])
