"""Zero-shot evaluation through lm-eval on a tiny Llama with a tiny offline tokenizer and tiny local
tasks written here: the plain and the compiled (flattenquant O1) model, missing tasks, malformed files, and
the task configs, which are lm-eval's built-in ones with only the data source swapped."""

import json
from pathlib import Path

import pytest
import torch

import fq_compile
from fq_compile.runtime.state import reports
from fq_compile.tools.zeroshot import TASKS, builtin_config_path, evaluate_zero_shot, task_file, write_task_yaml
from tests.conftest import VOCAB, batches, tiny_llama

ROWS = {
    "piqa": [dict(goal="how do you open a jar", sol1="twist the lid", sol2="eat the lid", label=0),
             dict(goal="how to dry wet hands", sol1="use a towel", sol2="use a fish", label=0),
             dict(goal="to boil water", sol1="put it in a freezer", sol2="heat it in a pot", label=1)],
    "arc_easy": [dict(id="q1", question="what do plants need to grow",
                      choices=dict(text=["light", "rocks", "plastic"], label=["A", "B", "C"]), answerKey="A"),
                 dict(id="q2", question="which one is a gas",
                      choices=dict(text=["ice", "steam", "wood", "salt"], label=["A", "B", "C", "D"]), answerKey="B")],
    "openbookqa": [dict(id="o1", question_stem="the sun is a",
                        choices=dict(text=["star", "planet", "moon", "rock"], label=["A", "B", "C", "D"]),
                        answerKey="A")],
    "lambada_openai": [dict(text="she opened the door and saw her old friend standing in the rain"),
                       dict(text="the cat sat on the warm mat")],
    "hellaswag": [dict(ind=4, activity_label="Removing ice from car", ctx_a="Then, the man writes over the snow.",
                       ctx_b="then", ctx="Then, the man writes over the snow. then",
                       endings=["he stops [title] and leaves.", "the man drives away.", "a woman waves.",
                                "he eats the snow."], source_id="x", split="val", split_type="indomain",
                       label="1")],
    "winogrande": [dict(sentence="The trophy does not fit in the case because the _ is too big.",
                        option1="trophy", option2="case", answer="1"),
                   dict(sentence="Sarah gave Maria a gift because _ was kind.", option1="Sarah", option2="Maria",
                        answer="2")],
}


def write_tasks(root: Path, names, json_array=("arc_easy",)):
    """Write ROWS[name] as <root>/<name>/<split>.jsonl (or a .json array, to cover both forms)."""
    for name in names:
        split = TASKS[name][1]
        (root / name).mkdir(parents=True, exist_ok=True)
        if name in json_array:
            (root / name / f"{split}.json").write_text(json.dumps(ROWS[name], indent=1))
        else:
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[name]))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer trained here on the tasks' own words (nothing from the hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [json.dumps(r) for rows in ROWS.values() for r in rows] + ["Question Answer :"]
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(text, trainers.WordLevelTrainer(vocab_size=VOCAB,
                                                           special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    assert tk.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def direct_loglikelihood(call, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) summed over the continuation's tokens, from the logits alone."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    assert whole[:len(ctx)] == ctx and len(whole) > len(ctx)
    with torch.no_grad():
        logp = call(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def stock_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """lm-eval's stock HFLM over `model` (plain or compiled), as evaluate_zero_shot builds it."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    req = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    (ll, _), = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=1).loglikelihood([req])
    return ll


def check_scores(res, ran):
    assert set(res["tasks"]) == set(ran)
    for t in ran:
        row = res["tasks"][t]
        for k in ("acc", "acc_norm"):
            if k in row:
                assert isinstance(row[k], float) and 0.0 <= row[k] <= 1.0, (t, k, row[k])
        assert "acc" in row
        assert row["samples"] == len(ROWS[t])
    assert 0.0 <= res["average"]["acc"] <= 1.0
    assert res["average"]["acc"] == pytest.approx(sum(res["tasks"][t]["acc"] for t in ran) / len(ran))


def test_plain_model_all_tasks_and_missing(tmp_path, tokenizer, capsys):
    model = tiny_llama()
    write_tasks(tmp_path, ["piqa", "arc_easy", "lambada_openai", "hellaswag", "winogrande"])
    res = evaluate_zero_shot(model, tokenizer, tasks=list(TASKS), data_dir=tmp_path, progress=False)
    check_scores(res, ["piqa", "arc_easy", "lambada_openai", "hellaswag", "winogrande"])
    assert "acc_norm" in res["tasks"]["piqa"] and "acc_norm" not in res["tasks"]["winogrande"]
    assert res["tasks"]["lambada_openai"]["perplexity"] > 1
    assert list(res["missing"]) == ["openbookqa"] and "openbookqa/test.jsonl" in res["missing"]["openbookqa"]
    assert "openbookqa missing" in capsys.readouterr().out

    empty = evaluate_zero_shot(model, tokenizer, tasks="piqa,hellaswag", data_dir=tmp_path / "piqa", progress=False)
    assert empty["tasks"] == {} and set(empty["missing"]) == {"piqa", "hellaswag"}


def test_compiled_model_is_what_lm_eval_calls(tmp_path, tokenizer):
    model = tiny_llama()
    plan = fq_compile.calibrate(model, batches(n=2), fq_compile.Config(level="O1"), progress=False)
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan})
    write_tasks(tmp_path, ["piqa", "arc_easy"])
    res = evaluate_zero_shot(fast, tokenizer, tasks=["piqa", "arc_easy", "winogrande"], data_dir=tmp_path,
                             batch_size=2, progress=False)
    check_scores(res, ["piqa", "arc_easy"])
    assert set(res["missing"]) == {"winogrande"}
    assert len(reports(plan)) > 0                       # the flattenquant backend compiled the graphs lm-eval ran

    # lm-eval's log-likelihood is the compiled model's, token for token, and not the fp32 model's
    ctx, cont = "Question: how to dry wet hands\nAnswer:", " use a towel"
    ll_q = stock_loglikelihood(fast, tokenizer, ctx, cont)
    assert ll_q == pytest.approx(direct_loglikelihood(fast, tokenizer, ctx, cont), abs=1e-4)
    assert abs(ll_q - direct_loglikelihood(model, tokenizer, ctx, cont)) > 1e-5


def test_limit_bad_input_and_malformed_files(tmp_path, tokenizer):
    model = tiny_llama()
    write_tasks(tmp_path, ["piqa"])
    res = evaluate_zero_shot(model, tokenizer, tasks=["piqa"], data_dir=tmp_path, limit=1, progress=False)
    assert res["tasks"]["piqa"]["samples"] == 1 and res["limit"] == 1
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        evaluate_zero_shot(model, tokenizer, tasks=["piqa", "mmlu"], data_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        evaluate_zero_shot(model, tokenizer, tasks=["piqa"], data_dir=tmp_path / "nowhere")
    with pytest.raises(TypeError, match="causal LM"):
        evaluate_zero_shot(lambda ids: None, tokenizer, tasks=["piqa"], data_dir=tmp_path)
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.jsonl").write_text(json.dumps({"question": "q", "choices": {}}) + "\n")
    with pytest.raises(ValueError, match="answerKey"):
        evaluate_zero_shot(model, tokenizer, tasks=["arc_easy"], data_dir=tmp_path)
    (tmp_path / "arc_easy" / "test.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="test.jsonl"):
        evaluate_zero_shot(model, tokenizer, tasks=["arc_easy"], data_dir=tmp_path)


@pytest.mark.parametrize("task", list(TASKS))
def test_task_is_lm_eval_builtin_with_the_local_file(tmp_path, task):
    """Loaded through TaskManager(include_path=...), the task is lm-eval's built-in config (prompt,
    target, choices, metrics) with only the data source swapped, and scores every local row."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    write_tasks(tmp_path, [task])
    configs = tmp_path / "configs"
    configs.mkdir()
    write_task_yaml(configs, task, task_file(tmp_path, task), cache_dir=str(tmp_path / "cache"))
    loaded = TaskManager(include_path=str(configs), include_defaults=False).load([task])["tasks"][task]
    builtin = load_yaml(builtin_config_path(task), resolve_func=True)
    cfg = loaded.config
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "process_docs", "output_type"):
        assert getattr(cfg, key, None) == builtin.get(key), key
    assert [m["metric"] for m in cfg.metric_list] == [m["metric"] for m in builtin["metric_list"]]
    assert cfg.dataset_path == "json"
    assert cfg.dataset_kwargs["data_files"] == {TASKS[task][1]: str(task_file(tmp_path, task))}
    assert len(list(loaded.eval_docs)) == len(ROWS[task]) and cfg.training_split is None


def test_accuracy_benchmark_zero_shot_table(tmp_path, tokenizer):
    """benchmarks/accuracy.py --tasks goes through the same evaluate_zero_shot (its call had drifted
    from the signature and failed at the first row)."""
    import importlib.util
    from types import SimpleNamespace

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("fq_bench_accuracy", path)
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    write_tasks(tmp_path, ["piqa"])
    args = SimpleNamespace(tasks="piqa,arc_easy", data_dir=str(tmp_path), zs_limit=0, zs_batch_size=16)
    res = accuracy.zero_shot(args, tiny_llama(), tokenizer)
    check_scores(res, ["piqa"])
    assert set(res["missing"]) == {"arc_easy"}
