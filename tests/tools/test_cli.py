"""The command line, the loader and the perplexity protocol, on a tiny offline model directory."""

import json
import math

import pytest
import torch

from fq_compile.tools.cli import main
from fq_compile.tools.evaluate import perplexity
from fq_compile.tools.models import OPT_SHAPES, load_model, opt_config
from tests.conftest import tiny_llama

WORDS = ("the cat sat on a mat while a dog ran to the park and the sun was warm over a quiet town "
         "where people read books drank tea and walked home late at night").split()


def _text(n_lines: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_lines):
        idx = torch.randint(0, len(WORDS), (12,), generator=g).tolist()
        lines.append(" " + " ".join(WORDS[i] for i in idx) + " \n")
    return "".join(lines)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "<unk>", "<s>", "</s>"]
    tk.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=special))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tiny_llama(layers=1).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2").mkdir()
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(_text(40, 0))
    (data / "wikitext-2" / "valid.txt").write_text(_text(40, 1))
    return root


def test_loader_local_dir_and_opt_alias(model_dir):
    lm = load_model(str(model_dir / "model"))
    assert type(lm.model).__name__ == "LlamaForCausalLM" and not lm.model.training and lm.tokenizer is not None
    cfg = opt_config("opt-13b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.ffn_dim) == (5120, 40, 20480)
    assert set(OPT_SHAPES) >= {"opt-125m", "opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b"}
    with pytest.raises(FileNotFoundError):
        load_model(str(model_dir / "nothing-here" / "model"))


def test_gguf_files_are_parsed_once_per_load(tmp_path):
    """fq_compile.tools.models.gguf_parsed_once: inside, one reader per file (the same object, the file's
    contents) and one tensor-name map per (architecture, blocks); outside, gguf's own functions again, also
    after an error inside."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from fq_compile.tools.models import gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        a, b = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert a is b and a.tensors[0].name == "token_embd.weight"
        assert np.array_equal(np.asarray(a.tensors[0].data).reshape(3, 4), np.arange(12).reshape(3, 4))
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
    with pytest.raises(RuntimeError, match="inside"), gguf_parsed_once():
        raise RuntimeError("inside")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)


def test_perplexity_protocol_against_direct_computation():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids, seqlen=128, progress=False)
    assert res.windows == 7 and res.tokens == 896 and not res.limited
    nll = []
    with torch.no_grad():
        for w in range(7):
            x = ids[w * 128:(w + 1) * 128]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            nll.append(-logp[torch.arange(127), x[1:]].mean())
    assert res.ppl == pytest.approx(math.exp(float(torch.stack(nll).mean())), rel=1e-5)
    assert perplexity(model, ids, seqlen=128, max_tokens=300, progress=False).windows == 2


def test_quantize_dump_eval(model_dir, tmp_path, capsys):
    common = ["--model", str(model_dir / "model"), "--data-dir", str(model_dir / "data"), "--calib-batches", "2",
              "--calib-seqlen", "24", "--no-progress"]
    plan = tmp_path / "tiny.fqplan"
    assert main(["quantize", *common, "--level", "O2", "--out", str(plan)]) == 0
    assert plan.exists()
    assert main(["dump", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "fq_compile plan for LlamaForCausalLM" in out and "INT4 share of layers" in out
    assert main(["dump", str(plan), "--full"]) == 0
    assert "KL4/KL8" in capsys.readouterr().out
    assert main(["dump", str(plan), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("layer,format,")
    js = tmp_path / "eval.json"
    torch._dynamo.reset()
    assert main(["eval", *common, "--level", "w8a8,O1", "--ppl-seqlen", "32", "--tasks", "piqa",
                 "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert set(res["levels"]) == {"fp32", "w8a8", "O1"}
    assert all(v["ppl"] > 1 and v["windows"] >= 3 for v in res["levels"].values())
    assert "piqa" in res["levels"]["fp32"]["zero_shot"]["missing"]
    assert "WikiText-2 PPL" in capsys.readouterr().out
    # a Config override reaches every level, and is recorded
    torch._dynamo.reset()
    assert main(["eval", *common, "--level", "O1", "--set", "beta=1.4", "--set", "weight_clip=mse",
                 "--ppl-seqlen", "32", "--tasks", "", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["overrides"] == ["beta=1.4", "weight_clip=mse"]
    assert res["levels"]["O1"]["config"]["beta"] == 1.4 and res["levels"]["O1"]["config"]["weight_clip"] == "mse"
    assert main(["eval", *common, "--set", "beta", "--tasks", ""]) == 2
    assert main(["eval", *common, "--set", "bogus=1", "--tasks", ""]) == 2


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["dump", str(tmp_path / "missing.fqplan")]) == 2
    (tmp_path / "junk.fqplan").write_bytes(b"junk" * 20)
    assert main(["dump", str(tmp_path / "junk.fqplan")]) == 2
    err = capsys.readouterr().err
    assert err.count("fq-compile: error:") == 2 and "Traceback" not in err


def test_demo_compiles_each_level_once_and_resets_nothing(model_dir, capsys, monkeypatch, tmp_path):
    """The main job end to end on the tiny model: tables, graph dump, continuations; each level's plan is
    compiled once (calibration ran the model at another length, so the graph is dynamic in the length
    and also serves the greedy steps), and no Dynamo cache is reset on the way."""
    from fq_compile.runtime.state import reports

    def no_reset():
        raise AssertionError("library code reset Dynamo")

    plans = []
    import fq_compile.tools.cli as cli

    real = cli._compile
    monkeypatch.setattr(cli, "_compile", lambda model, plan, **kw: plans.append(plan) or real(model, plan, **kw))
    monkeypatch.setattr(torch._dynamo, "reset", no_reset)
    import fq_compile.planning.calibrate as calibration

    runs, observe = [], calibration._observe
    monkeypatch.setattr(calibration, "_observe", lambda *a, **kw: runs.append(1) or observe(*a, **kw))
    assert main(["demo", "--model", str(model_dir / "model"), "--data-dir", str(model_dir / "data"),
                 "--calib-batches", "2", "--calib-seqlen", "24", "--ppl-seqlen", "32", "--ppl-tokens", "96",
                 "--max-new-tokens", "3", "--no-progress", "--json", str(tmp_path / "demo.json")]) == 0
    out = capsys.readouterr().out
    for text in ("fp32", "O1", "w8a8", "logits rel. error", "graph dump (O1", "greedy continuation",
                 "calibration (O1, fp8, w8a8)", "O1 perplexity: first call beyond a window (compile)", "total"):
        assert text in out
    # one calibration run serves every level (planning/calibrate.py: calibrate_many)
    stages = out.split("where the time went", 1)[1]
    assert stages.count("calibration") == 1 and "O1 calibration" not in stages and len(runs) == 1
    assert [p.config.level for p in plans] == ["O1", "fp8", "w8a8"]          # naive FP8 and W8A8 by default
    assert all(len(reports(p)) == 1 for p in plans)
    table = _demo_table(out)
    assert [r[0] for r in table] == ["fp32", "O1", "fp8", "w8a8"]
    assert "weight MiB (x fp16)" in out and "tok/s" not in out          # speed: on CUDA only
    fp8 = table[2]
    assert float(fp8[1]) > 1 and fp8[2].endswith("%") and fp8[-1].endswith("x)")
    runs = json.loads((tmp_path / "demo.json").read_text())["runs"]         # what benchmarks/plots.py reads
    assert list(runs) == ["fp32", "O1", "fp8", "w8a8"] and runs["fp8"]["ppl"] == pytest.approx(float(fp8[1]), 1e-3)
    assert all(r["weight_bytes"] > 0 and r["fp16_bytes"] == runs["fp32"]["weight_bytes"] for r in runs.values())
    # every level's continuation, beside the floating-point one
    grid = out.split("greedy continuation", 1)[1]
    assert all(f"| {name} " in grid for name in ("fp32", "O1", "fp8", "w8a8"))


def _demo_table(out: str) -> list[list[str]]:
    """The demo's perplexity table: rows of cells (split on runs of 2+ spaces)."""
    import re

    lines = out.split("WikiText-2 test perplexity", 1)[1].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("-----")) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith("weight MiB"):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_demo_speed_columns_shape(model_dir, capsys, monkeypatch):
    """The CUDA-only tokens/s columns, run on the CPU (the path is the same but for the device): a prefill and a
    decode figure for every row, the first generate() calls in the time table."""
    import fq_compile.tools.cli as cli

    monkeypatch.setattr(cli, "_measures_speed", lambda device: True)
    assert main(["demo", "--model", str(model_dir / "model"), "--data-dir", str(model_dir / "data"),
                 "--calib-batches", "2", "--calib-seqlen", "24", "--ppl-seqlen", "32", "--ppl-tokens", "64",
                 "--max-new-tokens", "2", "--decode-tokens", "3", "--compare", "fp8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prefill tok/s (1x32)" in out and "decode tok/s (1x3 new)" in out and "speed not measured" not in out
    table = _demo_table(out)
    assert [r[0] for r in table] == ["fp32", "O1", "fp8"]
    for row in table:
        assert float(row[-2].replace(",", "")) > 0 and float(row[-1].replace(",", "")) > 0, row
    assert "fp8: first generate() call (compiles)" in out


def test_tools_compile_without_inductor_on_the_cpu_only(monkeypatch):
    from fq_compile.tools.evaluate import compile_quantized

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    cpu_model = tiny_llama(layers=1)
    compile_quantized(cpu_model, "plan")
    compile_quantized(cpu_model, "plan", inductor=True, free_weights=False)
    compile_quantized(tiny_llama(layers=1).to("meta"), "plan")          # any other device: Inductor
    assert [c["options"]["inductor"] for c in calls] == [False, True, True]
    assert all(c["backend"] == "flattenquant" and c["options"]["plan"] == "plan" for c in calls)
    assert calls[1]["options"]["free_weights"] is False


def test_help_imports_neither_torch_nor_transformers():
    """The console script that pyproject.toml names answers `-h` (top level and every command, with each
    option's default) and a bad argument without importing torch, transformers or fq_compile."""
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    target = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]["fq-compile"]
    module, func = target.split("#")[0].strip().split(":")
    code = f"""
import contextlib, io, json, sys
from {module} import {func} as main
helps = {{}}
for argv in ([], ["demo"], ["quantize"], ["dump"], ["eval"]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(argv + ["-h"])
        except SystemExit as e:
            assert e.code == 0, e.code
    helps[" ".join(argv)] = buf.getvalue()
with contextlib.redirect_stderr(io.StringIO()):
    try:
        main(["eval", "--no-such-option"])
    except SystemExit as e:
        assert e.code == 2, e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "fq_compile"))
print(json.dumps(dict(heavy=heavy, helps=helps)))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(env, PYTHONPATH=str(root)),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["heavy"] == [], out["heavy"]
    helps = out["helps"]
    assert "demo" in helps[""] and "eval" in helps[""]
    for cmd in ("demo", "quantize", "dump", "eval"):
        assert "(default:" in helps[cmd], cmd
    flat = " ".join(helps["eval"].split())
    assert "(0: the whole split) (default: 0)" in flat and "(default: auto)" in flat
    assert "(default: fp8,w8a8)" in " ".join(helps["demo"].split())


def test_parser_copies_agree_with_the_package():
    """cli_parser.py cannot import the package (torch): its copies of the levels and tasks must match."""
    from fq_compile.config import LEVELS
    from fq_compile.tools import cli_parser
    from fq_compile.tools.zeroshot import DEFAULT_TASKS

    assert cli_parser.LEVELS == tuple(LEVELS) and cli_parser.ZERO_SHOT_TASKS == tuple(DEFAULT_TASKS)


def test_zero_shot_default_is_the_tasks_with_data(tmp_path, capsys):
    from argparse import Namespace

    from fq_compile.tools.cli import _zero_shot_tasks

    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n')
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.jsonl").write_text("{}\n")
    assert _zero_shot_tasks(Namespace(tasks="auto", data_dir=str(tmp_path))) == ["piqa", "arc_easy"]
    out = capsys.readouterr().out
    for missing in ("openbookqa", "lambada_openai", "hellaswag", "winogrande"):
        assert missing in out
    assert "piqa (" not in out
    assert _zero_shot_tasks(Namespace(tasks="piqa, hellaswag", data_dir=str(tmp_path))) == ["piqa", "hellaswag"]
    assert _zero_shot_tasks(Namespace(tasks="", data_dir=str(tmp_path))) == []
