"""Architecture x level matrix (issue 12): does each Hugging Face architecture quantize end to end, and
does the compiled model compute what its plan says?

    python benchmarks/architectures.py --out benchmarks/results/architectures-cpu.md
    python benchmarks/architectures.py --archs gpt2,falcon --levels O1,O2 --no-inductor

Models: tests/tiny_models.py (built from configs, random weights, outlier channels planted in the
decoder norms; 2 blocks, hidden 64), calibrated on random tokens.  For every (architecture, level),
side by side in one run:

  quantized layers   planned linear layers / all linear layers the graphs read (the rest are listed
                     in plan.skipped: Config.skip's lm_head and the embeddings tied to it, MoE
                     experts, ...), and the share of the linear-layer weight values that is quantized
  fp32 error         ||logits - fp32 logits|| / ||fp32 logits|| on held-out random tokens (2 x 24)
  oracle             the compiled model against the independent fake-quant oracle (tests/oracle.py):
                     the largest per-token relative error, and "match" when tests.oracle.assert_matches
                     accepts it (1e-5, but for a rounding tie under Inductor)
  generate           greedy generate() of --new-tokens tokens through the compiled model (in place,
                     model.compile): "same as oracle" when its tokens equal the oracle's greedy tokens

A cell that raises is reported with the exception, and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from tabulate import tabulate
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fq_compile  # noqa: E402
from benchmarks.provenance import git_rev  # noqa: E402
from tests.oracle import assert_matches, fake_quantized, rel_err  # noqa: E402
from tests.tiny_models import ARCHITECTURES, VOCAB  # noqa: E402

LEVELS = ("w8a8", "smoothquant", "O1", "O2", "O3")



def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _linear_weights(model: torch.nn.Module, plan) -> tuple[int, int, int, int]:
    """(quantized layers, all linear layers, quantized weight values, all linear-layer weight values).
    Linear layers: the planned ones and plan.skipped (everything the graphs read as a matmul weight)."""
    params = dict(model.named_parameters())

    def numel(name):
        p = params.get(name + ".weight", params.get(name))
        return 0 if p is None else p.numel()

    q = sum(numel(n) for n in plan.layers)
    return len(plan.layers), len(plan.layers) + len(plan.skipped), q, q + sum(numel(n) for n in plan.skipped)


def run_cell(arch: str, level: str, args, data, x, prompt) -> dict:
    """One (architecture, level): calibrate, oracle, compile, generate.  Never raises."""
    row = {"arch": arch, "level": level}
    t0 = time.monotonic()
    try:
        torch._dynamo.reset()
        model = ARCHITECTURES[arch](seed=args.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = fq_compile.calibrate(model, data, fq_compile.Config(level=level), progress=False)
        row["warned"] = any("stay in floating point" in str(w.message) for w in caught)
        nq, nall, wq, wall = _linear_weights(model, plan)
        row["layers"] = f"{nq}/{nall}"
        row["weights"] = f"{100 * wq / max(wall, 1):.0f}%"
        row["int4"] = sum(lp.bits == 4 for lp in plan.layers.values())
        row["kept"] = {n: why for n, why in plan.skipped.items() if "Config.skip" not in why}
        gen_kw = dict(max_new_tokens=args.new_tokens, do_sample=False, attention_mask=torch.ones_like(prompt),
                      pad_token_id=0)
        with torch.no_grad():
            ref = model(x).logits
            with fake_quantized(model, plan) as calls:
                expected = model(x).logits
                want = model.generate(prompt, **gen_kw)
            missing = set(plan.layers) - set(calls)
            if missing:
                raise RuntimeError(f"the oracle never reached {sorted(missing)}")
            torch._dynamo.reset()
            # in place, so that generate() runs the compiled module (torch.compile(model).generate would not)
            model.compile(backend="flattenquant", options={"plan": plan, "inductor": args.inductor})
            out = model(x).logits
            row["fp32 error"] = f"{rel_err(out, ref):.4f}"
            per_token = ((out - expected).double().norm(dim=-1) / expected.double().norm(dim=-1)).max()
            try:
                assert_matches(out, expected, inductor=args.inductor)
                verdict = "match"
            except AssertionError:
                verdict = "MISMATCH"
            row["oracle"] = f"{verdict} ({float(per_token):.1e})"
            try:
                got = model.generate(prompt, **gen_kw)
                same = torch.equal(got, want)
                row["generate"] = "same as oracle" if same else \
                    f"differs from oracle ({int((got != want).any(0).nonzero()[0])}th token)"
            except Exception as e:  # a failing generate() is a result of this benchmark, not a crash
                row["generate"] = f"error: {type(e).__name__}: {str(e)[:80]}"
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def render(rows: list[dict], args, header: str) -> str:
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["arch"], r["level"], "-", "-", "-", "-", f"error: {r['error']}"])
            continue
        table.append([r["arch"], r["level"], f"{r['layers']} ({r['weights']} of weights)", r["int4"],
                      r.get("fp32 error", "-"), r.get("oracle", "-"), r.get("generate", "-")])
    out = [header, "", tabulate(table, headers=["architecture", "level", "quantized layers", "INT4 layers",
                                                "fp32 error", "oracle (max per-token error)",
                                                f"generate ({args.new_tokens} greedy tokens)"],
                                tablefmt="github")]
    kept: dict[tuple[str, str, str], int] = {}
    for r in rows:                       # the same for every level of an architecture: list it once
        if r["level"] != next(x["level"] for x in rows if x["arch"] == r["arch"]):
            continue
        for name, why in r.get("kept", {}).items():
            key = (r["arch"], re.sub(r"\.\d+\.", ".*.", name), why)
            kept[key] = kept.get(key, 0) + 1
    if kept:
        out += ["", "## Kept in floating point besides Config.skip (lm_head and the embeddings tied to it)", ""]
        out += [f"- {arch}: `{name}` ({n}x): {why}" for (arch, name, why), n in kept.items()]
    warned = sorted({r["arch"] for r in rows if r.get("warned")})
    out += ["", f"calibrate() warned that weights stay in floating point for: {', '.join(warned) or 'none'}"]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated, of: " + ", ".join(ARCHITECTURES))
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--no-inductor", dest="inductor", action="store_false",
                    help="run the rewritten graphs eagerly (faster; the oracle then matches bit for bit)")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    args = ap.parse_args(argv)
    archs, levels = args.archs.split(","), args.levels.split(",")
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        ap.error(f"unknown architecture(s) {unknown}; known: {', '.join(ARCHITECTURES)}")
    g = torch.Generator().manual_seed(args.seed + 1)
    data = [torch.randint(0, VOCAB, (2, 32), generator=g) for _ in range(4)]
    x = torch.randint(0, VOCAB, (2, 24), generator=g)
    prompt = torch.randint(1, VOCAB, (2, 8), generator=g)
    command = "python benchmarks/architectures.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = (f"# Architecture x level matrix on tiny random models\n\n"
              f"command: {command}\n"
              f"date: {datetime.date.today()}; machine: {_cpu_name()}, {torch.get_num_threads()} threads, "
              f"{platform.system()} {platform.machine()}; torch {torch.__version__}, transformers "
              f"{transformers.__version__}; git {git_rev()}; "
              f"{'Inductor' if args.inductor else 'rewritten graphs run eagerly (--no-inductor)'}\n"
              f"models: tests/tiny_models.py, 2 blocks, hidden 64, vocab {VOCAB}, seed {args.seed}, outlier "
              f"channels planted; calibration: 4 x (2 x 32) random tokens; evaluation: 2 x 24 random tokens; "
              f"prompt for generate(): 2 x 8")
    rows = []
    for arch in tqdm(archs, desc="architectures"):
        for level in levels:
            rows.append(run_cell(arch, level, args, data, x, prompt))
            text = render(rows, args, header)
            if args.out:
                args.out.write_text(text)
    print(text)
    return 0 if all("error" not in r and r.get("oracle", "").startswith("match") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
