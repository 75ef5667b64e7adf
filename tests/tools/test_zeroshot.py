"""Zero-shot evaluation through lm-eval on a tiny Llama with a tiny offline tokenizer and tiny local
tasks written here: the plain and the compiled (flattenquant O1) model, missing tasks, the wrapper's
log-likelihood against a direct computation, and our task configs against lm-eval's built-in ones."""

import json
from pathlib import Path

import pytest
import torch

import fq_compile
from fq_compile.runtime.state import reports
from fq_compile.tools.zeroshot import (
    _TASKS,
    evaluate_zero_shot,
    make_lm,
    task_config,
    task_file,
)
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
        split = _TASKS[name][0]
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


def wrapper_loglikelihood(lm, context: str, continuation: str) -> float:
    from lm_eval.api.instance import Instance

    req = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    (ll, _), = lm.loglikelihood([req])
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
    res = evaluate_zero_shot(model, model, tokenizer, tasks=list(_TASKS), data_dir=tmp_path, progress=False)
    check_scores(res, ["piqa", "arc_easy", "lambada_openai", "hellaswag", "winogrande"])
    assert "acc_norm" in res["tasks"]["piqa"] and "acc_norm" not in res["tasks"]["winogrande"]
    assert res["tasks"]["lambada_openai"]["perplexity"] > 1
    assert list(res["missing"]) == ["openbookqa"] and "openbookqa/test.jsonl" in res["missing"]["openbookqa"]
    assert "openbookqa missing" in capsys.readouterr().out
    assert res["calls"] > 0

    empty = evaluate_zero_shot(model, model, tokenizer, tasks="piqa,hellaswag", data_dir=tmp_path / "piqa",
                               progress=False)
    assert empty["tasks"] == {} and set(empty["missing"]) == {"piqa", "hellaswag"} and empty["calls"] == 0


def test_compiled_model_is_what_lm_eval_calls(tmp_path, tokenizer):
    model = tiny_llama()
    plan = fq_compile.calibrate(model, batches(n=2), fq_compile.Config(level="O1"), progress=False)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="flattenquant", options={"plan": plan})
    calls = []

    def through_fast(*args, **kwargs):
        calls.append(args[0].shape)
        return fast(*args, **kwargs)

    write_tasks(tmp_path, ["piqa", "arc_easy"])
    res = evaluate_zero_shot(through_fast, model, tokenizer, tasks=["piqa", "arc_easy", "winogrande"],
                             data_dir=tmp_path, batch_size=2, progress=False)
    check_scores(res, ["piqa", "arc_easy"])
    assert set(res["missing"]) == {"winogrande"}
    assert len(calls) == res["calls"] > 0
    assert len(reports(plan)) > 0                       # the flattenquant backend compiled the graphs it ran

    # the wrapper's log-likelihood is the compiled model's, token for token, and not the fp32 model's
    lm = make_lm(fast, model, tokenizer, progress=False)
    ctx, cont = "Question: how to dry wet hands\nAnswer:", " use a towel"
    ll_q = wrapper_loglikelihood(lm, ctx, cont)
    assert ll_q == pytest.approx(direct_loglikelihood(fast, tokenizer, ctx, cont), abs=1e-4)
    assert abs(ll_q - direct_loglikelihood(model, tokenizer, ctx, cont)) > 1e-5


def test_wrapper_loglikelihood_matches_direct_computation(tokenizer):
    model = tiny_llama()
    lm = make_lm(model, model, tokenizer, progress=False)
    for ctx, cont in (("Question: to boil water\nAnswer:", " heat it in a pot"),
                      ("the cat sat on the warm", " mat")):
        ll = wrapper_loglikelihood(lm, ctx, cont)
        assert ll < 0
        assert ll == pytest.approx(direct_loglikelihood(model, tokenizer, ctx, cont), abs=1e-4)


def test_wrapper_scores_like_lm_eval_stock_hf_wrapper_in_batches(tokenizer):
    """Our wrapper, batched (right padding), gives lm-eval's stock HFLM's log-likelihoods, one at a time."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = tiny_llama()
    pairs = [("Question: to boil water\nAnswer:", " heat it in a pot"), ("the cat sat on the warm", " mat"),
             ("Question: which one is a gas\nAnswer:", " steam"), ("The trophy does not fit", " in the case"),
             ("she opened the door and saw her old friend standing in the", " rain")]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, backend="causal").loglikelihood(reqs)
    ours = make_lm(model, model, tokenizer, batch_size=3, progress=False).loglikelihood(reqs)
    assert [g for _, g in ours] == [g for _, g in stock]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in stock], abs=1e-4)


def test_limit_bad_input_and_malformed_files(tmp_path, tokenizer):
    model = tiny_llama()
    write_tasks(tmp_path, ["piqa"])
    res = evaluate_zero_shot(model, model, tokenizer, tasks=["piqa"], data_dir=tmp_path, limit=1, progress=False)
    assert res["tasks"]["piqa"]["samples"] == 1 and res["limit"] == 1
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        evaluate_zero_shot(model, model, tokenizer, tasks=["piqa", "mmlu"], data_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        evaluate_zero_shot(model, model, tokenizer, tasks=["piqa"], data_dir=tmp_path / "nowhere")
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.jsonl").write_text(json.dumps({"question": "q", "choices": {}}) + "\n")
    with pytest.raises(ValueError, match="answerKey"):
        evaluate_zero_shot(model, model, tokenizer, tasks=["arc_easy"], data_dir=tmp_path)
    (tmp_path / "arc_easy" / "test.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="test.jsonl"):
        evaluate_zero_shot(model, model, tokenizer, tasks=["arc_easy"], data_dir=tmp_path)
    other = tiny_llama(seed=1)
    with pytest.raises(ValueError, match="different module"):
        make_lm(torch.compile(other, backend="flattenquant", options={"plan": None}), model, tokenizer)


def _builtin_config(task: str) -> dict:
    """lm-eval's own YAML for `task`, functions resolved, found through its task index."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        pytest.skip("this lm-eval has no lm_eval.tasks._yaml_loader")
    import lm_eval.tasks

    rel = {"openbookqa": "openbookqa/openbookqa.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
           "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
           "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml"}[task]
    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / rel, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    return cfg


@pytest.mark.parametrize("task", list(_TASKS))
def test_configs_build_the_same_requests_as_lm_eval_builtin_tasks(tmp_path, task):
    """Our config and lm-eval's built-in one, both over the same local rows, send the model exactly the
    same (context, continuation) pairs and score them by the same metrics."""
    from lm_eval.api.task import ConfigurableTask

    write_tasks(tmp_path, [task])
    ours_cfg = task_config(task, task_file(tmp_path, task), cache_dir=str(tmp_path / "cache"))
    builtin_cfg = {**_builtin_config(task), **{k: v for k, v in ours_cfg.items()
                                                if k.startswith("dataset_") or k.endswith("_split")}}
    builtin_cfg["num_fewshot"] = 0
    tasks = [ConfigurableTask(config=c) for c in (ours_cfg, builtin_cfg)]
    requests = []
    for t in tasks:
        t.build_all_requests(rank=0, world_size=1)
        requests.append([(i.request_type, i.arguments, i.doc_id) for i in t.instances])
    assert requests[0] == requests[1] and len(requests[0]) >= len(ROWS[task])
    docs = list(tasks[0].eval_docs)
    assert [tasks[0].doc_to_target(d) for d in docs] == [tasks[1].doc_to_target(d) for d in docs]
    assert ({m["metric"] for m in ours_cfg["metric_list"]} == {m["metric"] for m in builtin_cfg["metric_list"]})
