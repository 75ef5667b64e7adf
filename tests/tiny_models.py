"""Tiny Hugging Face causal LMs built from configs (random weights), with outlier channels planted
the way real LLMs have them: a few LayerNorm/RMSNorm gain channels scaled 20-100x, so that a
handful of activation channels dominate the per-tensor range.

`ARCHITECTURES` maps a short name to a builder `(seed, hidden, layers, outliers) -> model`; the
tests (through conftest.py) and benchmarks/architectures.py use the same builders.
"""

from __future__ import annotations

import torch
import transformers as hf

VOCAB = 256
OUTLIER_CHANNELS = (3, 17, 40)
OUTLIER_GAINS = (20.0, 60.0, 100.0)


def plant_outliers(norms) -> None:
    """Scale a few channels of each norm's gain.  Gemma's RMSNorm multiplies by (1 + weight)."""
    with torch.no_grad():
        for norm in norms:
            offset = 1.0 if "Gemma" in type(norm).__name__ else 0.0
            for c, gain in zip(OUTLIER_CHANNELS, OUTLIER_GAINS):
                norm.weight[c] = (norm.weight[c] + offset) * gain - offset


def decoder_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The norms inside the decoder blocks (those that feed linear layers; not the final norm, not
    per-head q/k norms)."""
    out = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        in_block = any(f".{b}." in f".{name}." for b in ("layers", "h"))
        if ("Norm" in type(mod).__name__ and in_block and isinstance(w, torch.Tensor) and w.dim() == 1
                and not name.endswith(("q_norm", "k_norm"))):
            out.append(mod)
    return out


def _finish(model, seed_outliers: bool):
    model = model.eval()
    if seed_outliers:
        plant_outliers(decoder_norms(model))
    return model


def tiny_opt(seed: int = 0, hidden: int = 64, layers: int = 2, outliers: bool = True):
    torch.manual_seed(seed)
    cfg = hf.OPTConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden,
                       num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden)
    return _finish(hf.OPTForCausalLM(cfg), outliers)


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, kv_heads: int = 2, outliers: bool = True):
    torch.manual_seed(seed)
    cfg = hf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return _finish(hf.LlamaForCausalLM(cfg), outliers)


def _llama_like(config_cls, model_cls, **extra):
    def build(seed: int = 0, hidden: int = 64, layers: int = 2, outliers: bool = True):
        torch.manual_seed(seed)
        kw = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)
        kw.update(extra)
        return _finish(model_cls(config_cls(**kw)), outliers)
    return build


def tiny_gpt2(seed: int = 0, hidden: int = 64, layers: int = 2, outliers: bool = True):
    torch.manual_seed(seed)
    cfg = hf.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                        bos_token_id=0, eos_token_id=0)
    return _finish(hf.GPT2LMHeadModel(cfg), outliers)


def tiny_falcon(seed: int = 0, hidden: int = 64, layers: int = 2, outliers: bool = True):
    torch.manual_seed(seed)
    cfg = hf.FalconConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          bias=True, bos_token_id=0, eos_token_id=0)
    return _finish(hf.FalconForCausalLM(cfg), outliers)


def tiny_gpt_neox(seed: int = 0, hidden: int = 64, layers: int = 2, outliers: bool = True):
    torch.manual_seed(seed)
    cfg = hf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=2 * hidden, max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    return _finish(hf.GPTNeoXForCausalLM(cfg), outliers)


def tiny_mixtral(seed: int = 0, hidden: int = 64, layers: int = 2, outliers: bool = True):
    torch.manual_seed(seed)
    cfg = hf.MixtralConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                           intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                           tie_word_embeddings=False)
    return _finish(hf.MixtralForCausalLM(cfg), outliers)


def tiny_qwen2_moe(seed: int = 0, hidden: int = 64, layers: int = 2, outliers: bool = True):
    torch.manual_seed(seed)
    cfg = hf.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                            intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                            shared_expert_intermediate_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                            tie_word_embeddings=False)
    return _finish(hf.Qwen2MoeForCausalLM(cfg), outliers)


tiny_qwen2 = _llama_like(hf.Qwen2Config, hf.Qwen2ForCausalLM)
tiny_phi3 = _llama_like(hf.Phi3Config, hf.Phi3ForCausalLM, pad_token_id=0, bos_token_id=0, eos_token_id=0)
tiny_mistral = _llama_like(hf.MistralConfig, hf.MistralForCausalLM)
tiny_gemma = _llama_like(hf.GemmaConfig, hf.GemmaForCausalLM, head_dim=16)

ARCHITECTURES = {
    "opt": tiny_opt,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "phi3": tiny_phi3,
    "gpt2": tiny_gpt2,
    "falcon": tiny_falcon,
    "mistral": tiny_mistral,
    "gemma": tiny_gemma,
    "gpt_neox": tiny_gpt_neox,
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
}
