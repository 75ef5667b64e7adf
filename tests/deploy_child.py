"""The fresh process of tests/test_deploy.py: loads artefacts that the test process saved.

    python -m tests.deploy_child roundtrip ROOT ARCH[:inductor] ...
        run ROOT/inputs.safetensors through each loaded + compiled ROOT/ARCH, write ROOT/got.safetensors
    python -m tests.deploy_child peak ARTEFACT
        peak RSS while loading, as JSON on stdout
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path


def status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM (and getrusage's ru_maxrss) to the current RSS (Linux: /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def roundtrip(root: Path, specs: list[str]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    import fq_compile

    inputs = load_file(root / "inputs.safetensors")
    got = {}
    for spec in specs:
        arch, _, inductor = spec.partition(":")
        torch._dynamo.reset()
        model = fq_compile.load_quantized(root / arch)
        params = dict(model.named_parameters(remove_duplicate=False))
        assert model.fq_artefact["quantized"] and all(params[n].untyped_storage().nbytes() == 0
                                                      for n in model.fq_artefact["quantized"])
        try:
            with torch.no_grad():
                model(inputs["prefill"])
        except RuntimeError as e:
            assert "loaded from a quantized artefact" in str(e), e
        else:
            raise AssertionError(f"{arch}: the un-compiled loaded model ran")
        fast = torch.compile(model, backend="flattenquant", options={"plan": model.fq_plan,
                                                                     "inductor": inductor == "inductor"})
        with torch.no_grad():
            for key in ("prefill", "decode"):
                got[f"{arch}.{key}"] = fast(inputs[key]).logits
            got[f"{arch}.generate"] = fast.generate(inputs["prompt"], max_new_tokens=6, min_new_tokens=6,
                                                    do_sample=False)
        print(f"{arch}: done", flush=True)
    save_file({k: v.contiguous() for k, v in got.items()}, str(root / "got.safetensors"))


def peak(path: Path) -> None:
    import torch  # noqa: F401
    import transformers

    import fq_compile
    from fq_compile.deploy import read_manifest

    manifest = read_manifest(path, verify=False)
    getattr(transformers, manifest["architecture"])      # the model's module, imported lazily, before the baseline
    transformers.AutoConfig.from_pretrained(path)
    gc.collect()
    if not reset_peak():
        print(json.dumps({"error": "cannot reset the peak RSS (/proc/self/clear_refs)"}))
        return
    base = status()["VmRSS"]
    t = time.perf_counter()
    model = fq_compile.load_quantized(path)
    seconds = time.perf_counter() - t
    after = status()
    print(json.dumps({"base": base, "peak": after["VmHWM"], "delta": after["VmHWM"] - base,
                      "artefact": manifest["bytes"], "seconds": seconds,
                      "params": sum(p.untyped_storage().nbytes() for p in model.parameters())}))


if __name__ == "__main__":
    mode, target, *rest = sys.argv[1:]
    if mode == "roundtrip":
        roundtrip(Path(target), rest)
    else:
        peak(Path(target))
