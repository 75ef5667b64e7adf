"""Tensor parallelism end to end: a plan made once on the full model runs a model parallelised with
ColwiseParallel / RowwiseParallel over 2 CPU processes (gloo), and gives what the single-process
quantized model gives: logits within float32 rounding (the row-parallel all-reduce adds float
partial sums), the same greedy tokens.  Tiny OPT and Llama (grouped-query attention, smoothing in
the op for o_proj), INT4 and INT8 layers, per-tensor and per-channel weight scales."""

import functools
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fq_compile
from fq_compile import Config, PlanMismatchError, QuantPlan
from tests.conftest import VOCAB, batches, tiny_llama, tiny_opt

WORLD = 2
# per-tensor activation scales: under tensor parallelism a row-parallel layer's per-token scales are
# its rank's own row maxima (no collective), so token plans agree with one process only to quantization
# noise; these tests check the shard arithmetic bit for bit
MODELS = {"opt": (functools.partial(tiny_opt, layers=1), Config(level="O2", gamma=1.92, weight_scale="channel",
                                                               activation_scale="tensor")),
          "llama": (functools.partial(tiny_llama, layers=1), Config(level="O2", gamma=1.92, weight_scale="tensor",
                                                                   activation_scale="tensor"))}
NEW_TOKENS = 3
# per model, the sharded weight changed in place to check the fingerprints: column- and row-parallel
STALE = {"opt": "self_attn.q_proj.weight", "llama": "self_attn.o_proj.weight"}


def _generate(model, x):
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0)


def _reference(root: str, kind: str, device: torch.device, inductor: bool) -> None:
    """The single-process quantized model of `kind` (the full plan, no parallelism): its logits and
    greedy tokens, what every rank must reproduce."""
    from fq_compile.runtime.state import reports

    make, _ = MODELS[kind]
    ref = torch.load(f"{root}/{kind}.in")
    plan = QuantPlan.load(f"{root}/{kind}.fqplan")
    model = make().to(device)
    torch._dynamo.reset()
    model.compile(backend="flattenquant", options={"plan": plan, "inductor": inductor, "free_weights": False})
    with torch.no_grad():
        ref.update(logits=model(ref["x"].to(device)).logits.cpu(),
                   tokens=_generate(model, ref["prompt"].to(device)).cpu(), rewrite=_rewrite_summary(reports(plan)[0]))
    torch.save(ref, f"{root}/{kind}.ref")


def _worker(rank: int, root: str, port: int, device_type: str, inductor: bool) -> None:
    """One rank: the single-process references (one model kind per rank, side by side), then each
    tiny model parallelised and compiled with the full plan, its weights' fingerprints checked (a
    stale weight is refused by the per-call guard on the local shard, and by shard_plan), then with
    this rank's saved and reloaded plan (weights freed), and a synthetic plan made on the parallel
    model; saves what the parent checks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    from fq_compile.plan import weight_fingerprint
    from fq_compile.runtime.resident import resident_bytes
    from fq_compile.runtime.state import reports
    from fq_compile.runtime.tensor_parallel import layer_shard
    from fq_compile.tools.parallel import parallelize
    from fq_compile.tools.synthetic import synthetic_plan

    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=WORLD)
    try:
        for kind in list(MODELS)[rank::WORLD]:
            _reference(root, kind, device, inductor)
        dist.barrier()
        mesh = init_device_mesh(device.type, (WORLD,))
        out = {}
        for kind, (make, _) in MODELS.items():
            ref = torch.load(f"{root}/{kind}.ref")
            plan = QuantPlan.load(f"{root}/{kind}.fqplan")
            model = parallelize(make().to(device), mesh)
            torch._dynamo.reset()
            model.compile(backend="flattenquant", options={"plan": plan, "inductor": inductor, "free_weights": False})
            x = ref["x"].to(device)
            with torch.no_grad():
                res = dict(logits=model(x).logits.cpu(), tokens=_generate(model, ref["prompt"].to(device)).cpu())
            res["explain"] = fq_compile.explain(plan, full=True)
            res["rewrite"] = _rewrite_summary(reports(plan)[0])
            # a sharded weight changed in place on every rank: the guard refuses it from its local shard, and
            # so does shard_plan from the whole tensor; undone exactly (x 2 / 2), it runs again
            name, w = next((n, p) for n, p in model.named_parameters() if n.endswith(STALE[kind]))
            with torch.no_grad():
                w.mul_(2)
                res["stale"] = [_error(lambda: model(x)), _error(lambda: fq_compile.shard_plan(plan, model))]
                w.div_(2)
                res["restored"] = torch.equal(model(x).logits.cpu(), res["logits"])
            local = fq_compile.shard_plan(plan, model)
            lp = local.layers[name.removesuffix(".weight")]
            res["local_fingerprint"] = (lp.fingerprint, weight_fingerprint(w.to_local()),
                                        plan.layers[lp.name].fingerprint, weight_fingerprint(w))
            local.save(f"{root}/{kind}.rank{rank}.fqplan")
            local = QuantPlan.load(f"{root}/{kind}.rank{rank}.fqplan")
            torch._dynamo.reset()
            before = resident_bytes(model)["model"]
            model.compile(backend="flattenquant", options={"plan": local, "inductor": inductor, "free_weights": True})
            with torch.no_grad():
                res["local_logits"] = model(x).logits.cpu()
            res["freed"] = before - resident_bytes(model)["model"]
            res["released"] = sum(r.released_bytes for r in reports(local))
            res["local_explain"] = fq_compile.explain(local, full=True)
            out[kind] = res
        # a synthetic plan made on the parallel model is the full model's synthetic plan, sharded
        model = parallelize(tiny_opt().to(device), mesh)
        mine = synthetic_plan(model, "O3", flatten_ratio=0.25, int4_share=0.5, progress=False)
        want = fq_compile.shard_plan(QuantPlan.load(f"{root}/synthetic.fqplan"), model)
        out["synthetic_equal"] = all(
            torch.equal(getattr(mine.layers[n], k), getattr(want.layers[n], k))
            for n in want.layers for k in ("weight_q", "weight_scale")) and all(
            (mine.layers[n].fingerprint, mine.layers[n].bias_fingerprint)
            == (want.layers[n].fingerprint, want.layers[n].bias_fingerprint) for n in want.layers) and all(
            torch.equal(mine.groups[n].cmap.src, want.groups[n].cmap.src) for n in want.groups)
        out["partial_refused"] = _error(lambda: layer_shard(DTensor.from_local(torch.zeros(4, 4), mesh, [Partial()])))
        torch.save(out, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _error(fn) -> str:
    """The message of the PlanMismatchError that fn() raises; '' when it raises none."""
    try:
        fn()
    except PlanMismatchError as e:
        return str(e)
    return ""


def _rewrite_summary(report) -> tuple:
    """What the first graph's rewrite did: how many activation quantize ops (q/k/v share one: the
    rank reads the input through Dynamo's from_local calls) and where each layer's smoothing went."""
    return report.code.count("fq.flatten_quantize"), sorted((lr.layer, lr.op, lr.smoothing) for lr in report.layers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(root, device_type: str, inductor: bool, tolerance: float) -> None:
    """Plans calibrated on the full models and the inputs, then WORLD ranks (which also compute the
    single-process references); check what they saved."""
    from fq_compile.tools.synthetic import synthetic_plan

    device = torch.device(device_type)
    gen = torch.Generator().manual_seed(3)
    for kind, (make, config) in MODELS.items():
        plan = fq_compile.calibrate(make().to(device), [b.to(device) for b in batches(n=2)], config, progress=False)
        assert {lp.bits for lp in plan.layers.values()} == {4, 8}
        plan.save(root / f"{kind}.fqplan")
        torch.save(dict(x=torch.randint(0, VOCAB, (2, 11), generator=gen),
                        prompt=torch.randint(0, VOCAB, (1, 5), generator=gen)), root / f"{kind}.in")
    torch._dynamo.reset()
    synthetic_plan(tiny_opt().to(device), "O3", flatten_ratio=0.25, int4_share=0.5,
                   progress=False).save(root / "synthetic.fqplan")
    torch._dynamo.reset()

    mp.spawn(_worker, args=(str(root), _free_port(), device_type, inductor), nprocs=WORLD, join=True)

    for rank in range(WORLD):
        out = torch.load(root / f"rank{rank}.pt")
        for kind in MODELS:
            ref, res = torch.load(root / f"{kind}.ref"), out[kind]
            err = float((res["logits"] - ref["logits"]).abs().max())
            assert err <= tolerance * float(ref["logits"].abs().max()), (kind, rank, err)
            assert torch.equal(res["tokens"], ref["tokens"]), (kind, rank)
            assert res["rewrite"] == ref["rewrite"]              # same quantize ops, same folds as one process
            assert torch.equal(res["local_logits"], res["logits"])        # the rank-local plan runs the same ops
            assert res["released"] > 0 and res["freed"] == res["released"]
            for text in (res["explain"], res["local_explain"]):
                assert f"colwise {rank}/{WORLD} of" in text and f"rowwise {rank}/{WORLD} of" in text
                assert "tensor parallel (this rank)" in text
            # fingerprints: the per-call guard and shard_plan refuse the changed weight, the restored one runs
            assert all(STALE[kind] in e and "recalibrate" in e for e in res["stale"]), res["stale"]
            assert res["restored"]
            held, shard, full_plan, full = res["local_fingerprint"]
            assert held == shard and full_plan == full and held != full        # the rank-local plan: its shard's
        # per-rank shapes: this rank's q_proj holds half the rows of the full 64 x 64 weight
        assert re.search(r"self_attn\.q_proj +int8 +32x64->", out["llama"]["explain"]), out["llama"]["explain"]
        assert out["synthetic_equal"]
        assert "Partial" in out["partial_refused"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_tp2_equals_the_single_process_quantized_model(tmp_path):
    """CPU, reference ops run eagerly on both sides: every float op but the all-reduce is the same,
    so the logits agree to float32 rounding and the integers are identical."""
    _run(tmp_path, "cpu", inductor=False, tolerance=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tp2_nccl_under_inductor_on_two_gpus(tmp_path):
    """2 GPUs, NCCL, Inductor with our GPU kernels, against the single-GPU compiled model.  Inductor
    generates each side's float kernels (norms, attention, the all-reduced residual) for its own
    shapes, so a value may cross a rounding boundary of the next quantizer: the bound is that of a
    few flipped integers, while a wrong shard would be off by the order of the logits themselves."""
    _run(tmp_path, "cuda", inductor=True, tolerance=1e-3)
