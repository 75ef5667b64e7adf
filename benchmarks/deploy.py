"""Deploy from a quantized artefact (issue 27): its size, what loading it costs, and whether the loaded model
gives the saving process's output bit for bit.

    python benchmarks/deploy.py --model smollm2-135m --level O1 --out benchmarks/results/deploy-smollm2-135m-cpu.md
    python benchmarks/deploy.py --shape opt-13b --device cuda --level O3 --out $OUT/deploy-opt-13b-h100.md
    python benchmarks/deploy.py --shape opt-125m --out /tmp/deploy-smoke.md      # CPU smoke run of the shape mode

Saving (this process): --model loads a real model (fq_compile/tools/models.py) and calibrates it on
--calib-batches WikiText-2 validation windows; --shape builds an OPT of that size with random weights
(OPTConfig, fp16 on CUDA, fp32 on the CPU) and gives it a synthetic plan at the paper's Table 4 flatten
ratio and INT4 share (fq_compile/tools/synthetic.py, the fp weights released as they are quantized, as
benchmarks/e2e.py does).  The model is saved with fq_compile.save_quantized, compiled with its plan and
run once on a fixed prompt: the reference logits.

Loading (a fresh process, a fresh Inductor cache: what a user deploying on a new machine sees): imports,
then the peak RSS is reset (/proc/self/clear_refs) and CUDA's peak statistics too, then
    load     fq_compile.load_quantized(dir, device) (sha256 of every file included)
    first    torch.compile(model, backend="flattenquant", options={"plan": model.fq_plan}) and the first
             call on the prompt (Dynamo, the rewrite, Inductor on a GPU; the prefill gives the first token)
The peak host RSS above the post-import baseline and the peak GPU bytes allocated are read after each
step, and the first call's logits are compared with the reference (torch.equal).  --baseline also loads
the usual way in another fresh process (the fp model: from_pretrained / built from its config, then
QuantPlan.load), for the peak it takes.  On the CPU, the compiled model runs the fq:: ops without
Inductor, as the tools do (fq_compile/tools/evaluate.py: compile_quantized).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fq_compile  # noqa: E402
from benchmarks.provenance import git_rev  # noqa: E402

MB = 1e6
TARGET = 1.15          # issue 27: peak host and GPU memory while loading <= 1.15x the artefact
PROMPT = "The tower is 324 metres tall, about the same height as"


# -- measuring ---------------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class Peaks:
    """Peak host RSS above a baseline (after the imports) and peak CUDA bytes allocated, per step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        gc.collect()
        self.exact = _reset_peak()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.base = _status()["VmRSS"]
        self.gpu_base = torch.cuda.memory_allocated() if self.cuda else 0

    def read(self) -> dict:
        s = _status()
        out = {"host_peak": s["VmHWM"] - self.base, "host_now": s["VmRSS"] - self.base}
        if self.cuda:
            torch.cuda.synchronize()
            out.update(gpu_peak=torch.cuda.max_memory_allocated() - self.gpu_base,
                       gpu_reserved=torch.cuda.max_memory_reserved())
        return out


def _prompt_ids(args, tokenizer) -> torch.Tensor:
    if tokenizer is not None:
        return tokenizer(PROMPT, return_tensors="pt").input_ids
    return torch.randint(0, 50272, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))


def _compile(model, plan, device: torch.device, deterministic: bool = False):
    return torch.compile(model, backend="flattenquant", options={"plan": plan, "inductor": device.type != "cpu",
                                                                 "deterministic": deterministic})


# -- the fresh processes -----------------------------------------------------------------------------

def child_load(args) -> dict:
    """Load the artefact, compile, first call: times, peaks, bit-identity (see the module docstring)."""
    import transformers
    from safetensors.torch import load_file

    from fq_compile.deploy import read_manifest

    device = torch.device(args.device)
    manifest = read_manifest(args.dir, verify=False)
    getattr(transformers, manifest["architecture"])      # the model's module: imported before the baseline
    transformers.AutoConfig.from_pretrained(args.dir)
    ref = load_file(str(Path(args.work) / "reference.safetensors"))
    ids = ref["ids"].to(device)
    if device.type == "cuda":
        torch.zeros(1, device=device)                    # the CUDA context: before the baseline
    peaks = Peaks(device)
    t = time.perf_counter()
    model = fq_compile.load_quantized(args.dir, device=device)
    if peaks.cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    load = peaks.read()
    t = time.perf_counter()
    fast = _compile(model, model.fq_plan, device, args.deterministic)
    with torch.no_grad():
        logits = fast(ids).logits
        token = int(logits[0, -1].argmax())
    if peaks.cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t
    first = peaks.read()
    with torch.no_grad():
        t = time.perf_counter()
        fast(ids)
        if peaks.cuda:
            torch.cuda.synchronize()
        second_s = time.perf_counter() - t
    expected = ref.get("logits")
    same = None if expected is None else bool(torch.equal(logits.cpu(), expected))
    diff = None if expected is None else float((logits.cpu().float() - expected.float()).abs().max())
    digest = hashlib.sha256(logits.cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return {"load_s": load_s, "load": load, "first_s": first_s, "first": first, "second_s": second_s,
            "token": token, "digest": digest, "ref_token": None if expected is None else int(expected[0, -1].argmax()),
            "identical": same, "max_abs_diff": diff, "exact_peak": peaks.exact}


def child_baseline(args) -> dict:
    """The usual way: the floating-point model (from its source, or built from the config with random
    weights), then its plan; the peak this takes."""
    import transformers

    from fq_compile.tools.models import load_model, opt_config

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)
    if args.shape:
        transformers.OPTForCausalLM
    peaks = Peaks(device)
    t = time.perf_counter()
    if args.shape:
        with torch.device(device):
            model = transformers.OPTForCausalLM._from_config(opt_config(args.shape), dtype=_dtype(args)).eval()
    else:
        model = load_model(args.model, dtype=_dtype(args), device=device).model
    plan = fq_compile.QuantPlan.load(Path(args.dir) / "plan.fqplan")
    if peaks.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del model, plan
    return {"load_s": seconds, "load": peaks.read(), "exact_peak": peaks.exact}


# -- the saving process ------------------------------------------------------------------------------

def _dtype(args) -> torch.dtype:
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.float16 if args.device.startswith("cuda") and args.shape else torch.float32


def save(args, art: Path, work: Path) -> dict:
    """Build or load the model, plan it, save the artefact, and compute the reference logits."""
    from safetensors.torch import save_file

    from fq_compile.tools.models import load_model, opt_config

    device = torch.device(args.device)
    t = time.perf_counter()
    if args.shape:
        from transformers import OPTForCausalLM

        from fq_compile.tools.synthetic import PAPER_TABLE4, synthetic_plan

        torch.manual_seed(0)
        with torch.device(device):
            model = OPTForCausalLM._from_config(opt_config(args.shape), dtype=_dtype(args)).eval()
        tokenizer, name = None, f"{args.shape} shape, random weights"
        fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        size = args.shape.removeprefix("opt-")
        int4, ratio = PAPER_TABLE4.get(size, PAPER_TABLE4["13b"])      # (INT4 share, flatten ratio)
        plan = synthetic_plan(model, args.level, flatten_ratio=ratio if args.level != "w8a8" else 0.0,
                              int4_share=int4 if args.level in ("O2", "O3") else 0.0, release_weights=True,
                              source="paper Table 4 figures", progress=False)
        how = f"synthetic plan (paper Table 4 flatten ratio {ratio:.3f}" + (
            f", INT4 share {int4:.2f})" if args.level in ("O2", "O3") else ")")
    else:
        from fq_compile.tools.data import calibration_batches

        lm = load_model(args.model, dtype=_dtype(args), device=device)
        model, tokenizer, name = lm.model, lm.tokenizer, args.model
        fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        calib = calibration_batches(tokenizer, n=args.calib_batches, seqlen=args.calib_seqlen, seed=0,
                                    data_dir=args.data_dir)
        plan = fq_compile.calibrate(model, [c.to(device) for c in calib], fq_compile.Config(level=args.level),
                                    progress=False)
        how = f"calibrated on {args.calib_batches} x {args.calib_seqlen} WikiText-2 validation tokens"
    plan_s = time.perf_counter() - t
    t = time.perf_counter()
    fq_compile.save_quantized(model, plan, art, tokenizer=tokenizer)
    save_s = time.perf_counter() - t
    ids = _prompt_ids(args, tokenizer)
    ref = {"ids": ids}
    t = time.perf_counter()
    if not args.no_reference:
        with torch.no_grad():
            ref["logits"] = _compile(model, plan, device, args.deterministic)(ids.to(device)).logits.cpu().contiguous()
    reference_s = time.perf_counter() - t
    save_file(ref, str(work / "reference.safetensors"))
    manifest = json.loads((art / "manifest.json").read_text())
    files = manifest["files"]
    return {"name": name, "plan": how, "fp_bytes": fp_bytes, "plan_s": plan_s, "save_s": save_s,
            "reference_s": reference_s,
            "artefact": manifest["bytes"], "plan_bytes": files["plan.fqplan"]["bytes"],
            "fp_file": files["weights.safetensors"]["bytes"], "dtype": str(_dtype(args)).removeprefix("torch."),
            "layers": len(plan.layers), "prompt": int(ids.shape[1])}


def _run_child(mode: str, args, art: Path, work: Path, tag: int = 0) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--dir", str(art), "--work", str(work),
            "--device", args.device]
    for key in ("model", "shape", "dtype"):
        if getattr(args, key):
            argv += [f"--{key}", getattr(args, key)]
    if args.deterministic:
        argv.append("--deterministic")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-{mode}-{tag}"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"the {mode} process failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def report(args, saved: dict, loaded: dict, base: dict | None, command: str, load_start: str,
           runs: list[dict] | None = None) -> str:
    from tabulate import tabulate

    art = saved["artefact"]
    device = torch.device(args.device)

    def mb(v):
        return f"{v / MB:,.1f}"

    def x(v):
        return f"{v / MB:,.1f} ({v / art:.2f}x)"

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    machine = (f"{gpu}, " if gpu else "") + f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()} " \
              f"{platform.machine()}"
    lines = [f"# Deploy from a quantized artefact: {saved['name']}, {args.level}, {args.device}", "",
             f"command: `{command}`",
             f"date: {datetime.date.today().isoformat()}; machine: {machine}; torch {torch.__version__}, "
             f"transformers {__import__('transformers').__version__}; git {git_rev()}",
             f"model: {saved['name']} ({saved['dtype']}, {saved['layers']} quantized layers); plan: {saved['plan']}; "
             f"prompt: {saved['prompt']} tokens",
             f"load average (1, 5, 15 min) at start: {load_start}; at end: {_load_avg()} (times on a shared machine "
             "are only as good as it was idle; sizes, memory and bit-identity do not depend on it)", ""]
    sizes = [["artefact (all files)", mb(art)], ["  plan.fqplan (quantized weights, scales, channel maps)",
                                                 mb(saved["plan_bytes"])],
             ["  weights.safetensors (embeddings, norms, lm_head, skipped layers, buffers)", mb(saved["fp_file"])],
             [f"the model's {saved['dtype']} parameters (what the usual path loads first)", mb(saved["fp_bytes"])]]
    lines += ["## Sizes", "", tabulate(sizes, headers=["", "MB"], tablefmt="github"), ""]
    rows = [["load_quantized (sha256 of every file included)", f"{loaded['load_s']:.2f}",
             x(loaded["load"]["host_peak"]), x(loaded["load"]["gpu_peak"]) if "gpu_peak" in loaded["load"] else "-"],
            ["compile + first call (first token)", f"{loaded['first_s']:.2f}", x(loaded["first"]["host_peak"]),
             x(loaded["first"]["gpu_peak"]) if "gpu_peak" in loaded["first"] else "-"],
            ["second call", f"{loaded['second_s']:.2f}", "-", "-"]]
    if base is not None:
        rows.append(["usual path: fp model + QuantPlan.load (no compile)", f"{base['load_s']:.2f}",
                     x(base["load"]["host_peak"]), x(base["load"]["gpu_peak"]) if "gpu_peak" in base["load"] else "-"])
    lines += ["## Loading in a fresh process", "",
              tabulate(rows, headers=["step", "seconds", "peak host MB above imports (x artefact)",
                                      "peak GPU MB allocated (x artefact)"], tablefmt="github"), ""]
    if loaded["identical"] is None:
        ident = "not checked (--no-reference)"
    else:
        ident = ("bit-identical (torch.equal)" if loaded["identical"] else
                 f"DIFFERENT (max abs diff {loaded['max_abs_diff']:.3g})")
        ident += f"; first token {loaded['token']} (saving process: {loaded['ref_token']})"
    if runs and len(runs) > 1:
        agree = len({r["digest"] for r in runs}) == 1
        ident += (f". {len(runs)} loading processes (each its own Inductor cache): "
                  + ("" if loaded["identical"] is None else ", ".join(
                      f"{'same' if r['identical'] else 'different'} (max abs diff {r['max_abs_diff']:.3g})"
                      for r in runs) + " vs the saving process; ")
                  + f"among themselves {'identical' if agree else 'DIFFERENT'}")
    compile_mode = ("options={'deterministic': True} (Inductor's deterministic mode) on both sides"
                    if args.deterministic else "default options (Inductor times reduction configs)")
    within = loaded["load"]["host_peak"] <= TARGET * art and loaded["load"].get("gpu_peak", 0) <= TARGET * art
    lines += [f"First call's logits vs the saving process's: {ident}. Compiled with {compile_mode}.", "",
              f"Target (issue 27): peak host and GPU memory while loading <= {TARGET}x the artefact: "
              f"{'met' if within else 'NOT met'}."
              + ("" if loaded["exact_peak"] else " (the peak could not be reset after the imports here: it may "
                                                 "include them)"), "",
              f"Saving side: plan {saved['plan_s']:.1f} s, save_quantized {saved['save_s']:.1f} s. Peak host RSS "
              "counts the artefact's memory-mapped pages the process touched (file-backed) like any other. "
              "The load's baseline is taken after importing torch, transformers, fq_compile and the model's "
              "module and reading the config.", ""]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a real model (fq_compile/tools/models.py), e.g. smollm2-135m")
    src.add_argument("--shape", default=None, help="an OPT shape with random weights, e.g. opt-13b, opt-125m")
    p.add_argument("--level", default="O1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float16 for a shape on CUDA, else float32")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--prompt-len", type=int, default=128, help="random prompt length of --shape runs")
    p.add_argument("--no-reference", action="store_true", help="skip the saving side's compiled call")
    p.add_argument("--baseline", action="store_true", help="also measure the usual path (fp model + plan)")
    p.add_argument("--deterministic", action="store_true",
                   help="compile both sides with options={'deterministic': True} (Inductor's deterministic mode)")
    p.add_argument("--loads", type=int, default=1,
                   help="fresh loading processes (each its own Inductor cache); with 2 or more the report also "
                        "says whether they agree with each other (run-to-run) besides with the saving process")
    p.add_argument("--work", default=None, help="where the artefact goes (default: a temporary directory)")
    p.add_argument("--out", default=None, help="write the markdown here (it is printed either way)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child_load(args) if args.child == "load" else child_baseline(args)))
        return 0
    if not (args.model or args.shape):
        args.model = "smollm2-135m"
    command = "python benchmarks/deploy.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_start = _load_avg()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        art = work / "artefact"
        saved = save(args, art, work)
        print(f"saved {saved['artefact'] / MB:.1f} MB to {art} (build + plan {saved['plan_s']:.0f} s, save_quantized "
              f"{saved['save_s']:.0f} s, the saving side's compiled call {saved['reference_s']:.0f} s); loading in a "
              "fresh process", flush=True)
        torch._dynamo.reset()            # the saving side's graphs (and the plan they hold) go before the children run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        runs = [_run_child("load", args, art, work, tag=i) for i in range(max(1, args.loads))]
        loaded = runs[0]
        base = _run_child("baseline", args, art, work) if args.baseline else None
        text = report(args, saved, loaded, base, command, load_start, runs)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0 if all(r["identical"] in (True, None) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
