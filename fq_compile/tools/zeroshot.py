"""Zero-shot accuracy through lm-evaluation-harness, with the model called through any callable:
the plain module, or `torch.compile(model, backend="flattenquant", ...)`. lm-eval's own HF wrapper
(`HFLM`) does the tokenizing, batching and scoring; only the forward call is ours, which is the point:
the compiled model is a drop-in replacement for the module in existing inference code.

Tasks are read from local files, never from the hub (the evaluation machines are offline):

    <data_dir>/<task>/<split>.jsonl      (or <split>.json: JSON lines or one JSON array of rows)

    task            split        fields (the Hugging Face data set's own names)
    openbookqa      test         question_stem, choices {text, label}, answerKey      (allenai/openbookqa, main)
    lambada_openai  test         text                                               (EleutherAI/lambada_openai)
    piqa            validation   goal, sol1, sol2, label                            (piqa / baber/piqa)
    hellaswag       validation   activity_label, ctx_a, ctx_b, endings, label       (Rowan/hellaswag)
    winogrande      validation   sentence, option1, option2, answer ("1"/"2")       (allenai/winogrande, winogrande_xl)
    arc_easy        test         question, choices {text, label}, answerKey         (allenai/ai2_arc, ARC-Easy)

The split is the one lm-eval's built-in task scores, so numbers compare with published ones. Each
task config mirrors lm-eval's built-in YAML of the same name (prompt, target, choices, metrics; the
hellaswag and winogrande helpers are lm-eval's own functions), with only the data source swapped for
the local file; tests/test_zeroshot.py checks the prompts against the installed built-in configs.
A task whose file is absent is reported as missing, not an error.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from fq_compile.tools.data import find_data_dir

DEFAULT_TASKS = ("openbookqa", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy")

_ACC_NORM = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
             {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]

# task -> (split scored, required top-level fields, the config fields of lm-eval's built-in task).
# Functions are named as "module:function" and imported from lm-eval when the config is built.
_TASKS: dict[str, tuple[str, tuple[str, ...], dict]] = {
    "openbookqa": ("test", ("question_stem", "choices", "answerKey"), dict(
        output_type="multiple_choice", doc_to_text="question_stem",
        doc_to_target="{{choices.label.index(answerKey.lstrip())}}", doc_to_choice="{{choices.text}}",
        metric_list=_ACC_NORM)),
    "lambada_openai": ("test", ("text",), dict(
        output_type="loglikelihood", doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
        doc_to_target="{{' '+text.split(' ')[-1]}}",
        metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                     {"metric": "acc", "aggregation": "mean", "higher_is_better": True}])),
    "piqa": ("validation", ("goal", "sol1", "sol2", "label"), dict(
        output_type="multiple_choice", doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label",
        doc_to_choice="{{[sol1, sol2]}}", metric_list=_ACC_NORM)),
    "hellaswag": ("validation", ("activity_label", "ctx_a", "ctx_b", "endings", "label"), dict(
        output_type="multiple_choice", process_docs="lm_eval.tasks.hellaswag.utils:process_docs",
        doc_to_text="{{query}}", doc_to_target="{{label}}", doc_to_choice="choices", metric_list=_ACC_NORM)),
    "winogrande": ("validation", ("sentence", "option1", "option2", "answer"), dict(
        output_type="multiple_choice",   # partial scoring: the choices are the contexts, the target is shared
        doc_to_text="lm_eval.tasks.winogrande.preprocess_winogrande:doc_to_text",
        doc_to_target="lm_eval.tasks.winogrande.preprocess_winogrande:doc_to_target",
        doc_to_choice="lm_eval.tasks.winogrande.preprocess_winogrande:doc_to_choice",
        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])),
    "arc_easy": ("test", ("question", "choices", "answerKey"), dict(
        output_type="multiple_choice", doc_to_text="Question: {{question}}\nAnswer:",
        doc_to_target="{{choices.label.index(answerKey)}}", doc_to_choice="{{choices.text}}",
        metric_list=_ACC_NORM)),
}
_FUNCTION_FIELDS = ("process_docs", "doc_to_text", "doc_to_target", "doc_to_choice")


def task_file(data_dir: Path, task: str) -> Path | None:
    """The task's data file (`<task>/<split>.jsonl` before `.json`), or None when absent."""
    split = _TASKS[task][0]
    for ext in (".jsonl", ".json"):
        p = Path(data_dir) / task / f"{split}{ext}"
        if p.is_file():
            return p
    return None


def _first_row(path: Path) -> dict:
    """The first record, read without lm-eval, so a malformed file fails with its path in the message."""
    row = None
    try:
        with path.open(encoding="utf-8") as f:
            line = next((l for l in f if l.strip()), "")
        try:
            row = json.loads(line)           # JSON lines (whatever the extension), or an array on one line
        except json.JSONDecodeError:
            row = json.loads(path.read_text(encoding="utf-8"))     # a pretty-printed JSON array
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: neither JSON lines nor a JSON array ({e})") from None
    if isinstance(row, list):
        row = row[0] if row else None
    if not isinstance(row, dict):
        raise ValueError(f"{path}: no rows (expected JSON lines, or a JSON array of objects)")
    return row


def _resolve(ref):
    if not (isinstance(ref, str) and ":" in ref and ref.startswith("lm_eval.")):
        return ref
    import importlib

    module, name = ref.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"this lm-eval version lacks {ref} (the helper of its built-in task); "
                          f"lm-eval >= 0.4 is expected: {e}") from None


def task_config(task: str, path: str | os.PathLike, cache_dir: str | None = None) -> dict:
    """lm-eval's config for `task`, scoring the rows of the local file `path` zero-shot."""
    if task not in _TASKS:
        raise ValueError(f"unknown zero-shot task {task!r}; supported: {', '.join(_TASKS)}")
    split, _, fields = _TASKS[task]
    cfg = {"task": task, "dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": {split: str(path)}, **({"cache_dir": cache_dir} if cache_dir else {})},
           "training_split": None, "validation_split": None, "test_split": None, f"{split}_split": split,
           "num_fewshot": 0, "metadata": {"version": 1.0, "source": str(path)}}
    cfg.update({k: (_resolve(v) if k in _FUNCTION_FIELDS else v) for k, v in fields.items()})
    return cfg


def _hflm_class():
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ImportError("zero-shot evaluation needs lm-evaluation-harness: pip install 'fq-compile[eval]' "
                          "(or pip install lm-eval)") from None

    class CallableHFLM(HFLM):
        """lm-eval's HF causal-LM wrapper, with every forward pass sent through `model_call`."""

        def __init__(self, model_call, model, tokenizer, batch_size: int = 1, max_length: int | None = None,
                     progress: bool = True):
            if tokenizer is None:
                raise ValueError("zero-shot evaluation needs the model's tokenizer")
            super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                             max_length=max_length)
            self.model_call = model_call
            self.progress = progress
            self.calls = 0          # forward passes made through model_call

        def _model_call(self, inps, attn_mask=None, labels=None):
            if attn_mask is not None or labels is not None:
                raise NotImplementedError("only decoder-only (causal) models are supported")
            self.calls += 1
            with torch.no_grad():
                return self.model_call(inps, use_cache=False).logits

        def _model_generate(self, *args, **kwargs):
            # HF generate() would run the plain module and silently bypass model_call
            raise NotImplementedError("generation tasks are not supported: they would bypass model_call")

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.progress)

    return CallableHFLM


def make_lm(model_call, model=None, tokenizer=None, batch_size: int = 1, max_length: int | None = None,
            progress: bool = True):
    """An lm-eval `LM` whose forward passes all go through `model_call` (see `evaluate_zero_shot`)."""
    if model is None:
        model = getattr(model_call, "_orig_mod", model_call)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers causal-LM module, got {type(model).__name__}")
    orig = getattr(model_call, "_orig_mod", None)
    if orig is not None and orig is not model:
        raise ValueError("model_call was compiled from a different module than `model`")
    if not callable(model_call):
        raise TypeError("model_call must be callable (the module, or torch.compile of it)")
    return _hflm_class()(model_call, model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress)


@contextmanager
def _env(**values):
    """Set environment variables for the duration of the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _run_env(progress: bool):
    """lm-eval bootstraps perplexity's stderr in a multiprocessing pool: forking a process that holds a
    model and OpenMP threads is slow and can hang, and the serial loop is quick. Without progress,
    datasets' bars are silenced too (lm-eval's own per-task bars cannot be)."""
    import datasets

    shown = not datasets.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        with _env(DISABLE_MULTIPROC="1"):
            yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _task_manager():
    from lm_eval.tasks import TaskManager

    try:
        return TaskManager(include_defaults=False)    # our configs are self-contained: skip indexing ~10k YAMLs
    except TypeError:                                  # older lm-eval
        return TaskManager()


def evaluate_zero_shot(model_call, model=None, tokenizer=None, tasks=DEFAULT_TASKS, data_dir=None,
                       limit: int | None = None, batch_size: int = 1, max_length: int | None = None,
                       progress: bool = True, bootstrap_iters: int = 1000, lm=None) -> dict:
    """Zero-shot accuracy on `tasks` read from `data_dir` (see the module docstring for the layout).

    model_call: what computes the logits: `model` itself or `torch.compile(model, backend="flattenquant",
    options={"plan": plan})`; lm-eval calls it as `model_call(input_ids, use_cache=False).logits`.
    model: the plain module (for its config and device; default: `model_call._orig_mod`).
    limit: score only the first `limit` rows of each task (quick runs; reported in the result).
    lm: an existing wrapper from `make_lm`, to reuse.

    Returns {"tasks": {task: {"acc", "acc_stderr", "acc_norm"?, "acc_norm_stderr"?, "perplexity"?,
    "samples", "file"}}, "missing": {task: reason}, "average": {"acc", "acc_norm", "tasks"}, "limit",
    "data_dir", "calls"}. "average" is the mean over the tasks that ran; its acc_norm takes a task's acc
    where lm-eval gives no acc_norm (lambada_openai, winogrande), as zero-shot tables usually do.
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    tasks = [t.strip() for t in tasks]
    unknown = [t for t in tasks if t not in _TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {', '.join(unknown)}; supported: {', '.join(_TASKS)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive row count, got {limit}")
    root = find_data_dir(data_dir)
    result = {"tasks": {}, "missing": {}, "average": {}, "limit": limit,
              "data_dir": str(root) if root else None, "calls": 0}
    files = {}
    for t in tasks:
        path = task_file(root, t) if root is not None else None
        if path is None:
            split = _TASKS[t][0]
            where = (f"no {t}/{split}.jsonl or {t}/{split}.json under {root}" if root is not None
                     else "no data directory (pass data_dir / --data-dir or set FQ_DATA_DIR)")
            result["missing"][t] = where
            print(f"zero-shot: {t} missing ({where})")
            continue
        absent = [f for f in _TASKS[t][1] if f not in _first_row(path)]
        if absent:
            raise ValueError(f"{path}: rows lack the field(s) {', '.join(absent)} of the {t} data set "
                             f"(expected {', '.join(_TASKS[t][1])})")
        files[t] = path
    if not files:
        result["average"] = {"acc": None, "acc_norm": None, "tasks": []}
        return result

    from lm_eval import simple_evaluate

    lm = lm or make_lm(model_call, model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress)
    calls0 = lm.calls
    with tempfile.TemporaryDirectory(prefix="fq_zeroshot_") as cache, _run_env(progress):
        configs = [task_config(t, p, cache_dir=cache) for t, p in files.items()]
        out = simple_evaluate(model=lm, tasks=configs, num_fewshot=0, limit=limit, bootstrap_iters=bootstrap_iters,
                              task_manager=_task_manager(), log_samples=False)
    result["calls"] = lm.calls - calls0
    for t, p in files.items():
        raw = out["results"][t]
        row = {k.split(",")[0]: float(v) for k, v in raw.items()
               if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        row["samples"] = int(out.get("n-samples", {}).get(t, {}).get("effective", 0)) or None
        row["file"] = str(p)
        result["tasks"][t] = row
    ran = list(result["tasks"].values())
    result["average"] = {"acc": sum(r["acc"] for r in ran) / len(ran),
                         "acc_norm": sum(r.get("acc_norm", r["acc"]) for r in ran) / len(ran),
                         "tasks": list(result["tasks"])}
    return result


def format_table(result: dict) -> str:
    """The per-task table of one `evaluate_zero_shot` result (tabulate), missing tasks included."""
    from tabulate import tabulate

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    rows = [[t, pct(r.get("acc")), pct(r.get("acc_norm")), r.get("samples")] for t, r in result["tasks"].items()]
    rows += [[t, "missing", "", ""] for t in result["missing"]]
    if result["tasks"]:
        rows.append(["average", pct(result["average"]["acc"]), pct(result["average"]["acc_norm"]), ""])
    note = f"\n(limited run: first {result['limit']} rows per task)" if result.get("limit") else ""
    return tabulate(rows, headers=["task", "acc %", "acc_norm %", "rows"]) + note


def comparison_table(by_level: dict[str, dict]) -> str:
    """One row per level (fp32, O1, ...): each task's acc, then the averages; for `fq-compile eval`."""
    from tabulate import tabulate

    tasks = list(dict.fromkeys(t for r in by_level.values() for t in r["tasks"]))
    rows = []
    for level, r in by_level.items():
        accs = [f"{100 * r['tasks'][t]['acc']:.2f}" if t in r["tasks"] else "-" for t in tasks]
        avg = r["average"]
        rows.append([level, *accs] + [f"{100 * avg[k]:.2f}" if avg.get(k) is not None else "-"
                                      for k in ("acc", "acc_norm")])
    missing = sorted({t for r in by_level.values() for t in r["missing"]})
    limits = {r.get("limit") for r in by_level.values()} - {None}
    notes = ([f"missing (no local files): {', '.join(missing)}"] if missing else []) + \
            ([f"limited run: first {min(limits)} rows per task"] if limits else [])
    return tabulate(rows, headers=["level", *tasks, "avg acc", "avg acc_norm"]) + "".join(f"\n({n})" for n in notes)
