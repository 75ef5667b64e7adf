"""Tensor parallelism for Hugging Face decoders the way users set it up: `parallelize_module` with
the standard column / row plan (attention: q/k/v column-parallel, the output projection row-parallel;
MLP: up (and gate) column-parallel, down row-parallel).  Nothing here is specific to fq_compile: the
backend runs whatever DTensor linears it finds (fq_compile/passes/shard.py); this only saves tests,
benchmarks and users from writing the plan out.

    mesh = torch.distributed.device_mesh.init_device_mesh("cuda", (2,))
    parallelize(model, mesh)                     # in place
    model.compile(backend="flattenquant", options={"plan": plan})   # plan made on the full model
"""

from __future__ import annotations

import torch

# OPT has no tp plan in its Hugging Face config; the same column / row split as Llama's
OPT_TP_PLAN = {
    "decoder.layers.*.self_attn.q_proj": "colwise",
    "decoder.layers.*.self_attn.k_proj": "colwise",
    "decoder.layers.*.self_attn.v_proj": "colwise",
    "decoder.layers.*.self_attn.out_proj": "rowwise",
    "decoder.layers.*.fc1": "colwise",
    "decoder.layers.*.fc2": "rowwise",
}


def tp_plan(model: torch.nn.Module) -> dict[str, str]:
    """{module path pattern: 'colwise' | 'rowwise'} for the whole model: the config's own
    `base_model_tp_plan` (Llama, Mistral, Qwen2, ...) or OPT's, under the base model's prefix."""
    cfg = model.config
    base = getattr(cfg, "base_model_tp_plan", None) or (OPT_TP_PLAN if cfg.model_type == "opt" else None)
    if not base:
        raise ValueError(f"no tensor-parallel plan known for model_type={cfg.model_type!r}; pass one to "
                         "torch.distributed.tensor.parallel.parallelize_module yourself")
    prefix = getattr(model, "base_model_prefix", "")
    prefix = f"{prefix}." if prefix and hasattr(model, prefix) else ""
    odd = {v for v in base.values() if v not in ("colwise", "rowwise")}
    if odd:
        raise ValueError(f"{cfg.model_type}'s tp plan uses styles {sorted(odd)}; "
                         "only 'colwise' and 'rowwise' are mapped here")
    return {prefix + k: v for k, v in base.items()}


def parallelize(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """Apply `tp_plan(model)` over the 1-D device mesh `mesh` with ColwiseParallel / RowwiseParallel
    (in place), and give each attention module its per-rank head count where the model reads it
    from the module (OPT).  Returns the model."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if mesh.ndim != 1:
        raise ValueError(f"parallelize() takes a 1-D tensor-parallel mesh, got {mesh.ndim} dimensions")
    n = mesh.size()
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    heads = model.config.num_attention_heads
    kv = getattr(model.config, "num_key_value_heads", None) or heads
    if heads % n or kv % n:
        raise ValueError(f"{heads} attention heads ({kv} key/value heads) do not split over {n} ranks")
    parallelize_module(model, mesh, {k: styles[v]() for k, v in tp_plan(model).items()})
    for mod in model.modules():
        if hasattr(mod, "num_heads") and hasattr(mod, "q_proj") and mod.num_heads == heads:
            mod.num_heads = heads // n          # OPT's attention views its projections with num_heads
    return model
