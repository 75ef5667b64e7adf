"""Zero-shot accuracy through lm-evaluation-harness, of the plain module or the compiled one.

lm-eval does the work with its own stock pieces: its Hugging Face wrapper, `HFLM(pretrained=model)`,
calls whatever module it is given -- `torch.compile(model, backend="flattenquant", ...)` is a drop-in
replacement for the plain module, which is the point -- and its built-in task definitions (prompts,
targets, choices, metrics) score the rows.  Only the data source is ours: the evaluation machines are
offline, so each task reads a local file

    <data_dir>/<task>/<split>.jsonl      (or <split>.json: JSON lines or one JSON array of rows)

with the Hugging Face data set's own field names.  The split is the one lm-eval's built-in task scores,
so numbers compare with published ones (`TASKS` lists them).  For each task whose file exists, a small
YAML file that includes lm-eval's built-in config and swaps in the local file is written to a temporary
directory, and lm-eval loads it through `TaskManager(include_path=...)`.  A task whose file is absent is
reported as missing, not an error.
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

# task -> (lm-eval's built-in config, relative to lm_eval/tasks; the split it scores; the fields its prompts read)
TASKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", ("question_stem", "choices", "answerKey")),
    "lambada_openai": ("lambada/lambada_openai.yaml", "test", ("text",)),
    "piqa": ("piqa/piqa.yaml", "validation", ("goal", "sol1", "sol2", "label")),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    "winogrande": ("winogrande/default.yaml", "validation", ("sentence", "option1", "option2", "answer")),
    "arc_easy": ("arc/arc_easy.yaml", "test", ("question", "choices", "answerKey")),
}


def task_file(data_dir: Path, task: str) -> Path | None:
    """The task's data file (`<task>/<split>.jsonl` before `.json`), or None when absent."""
    split = TASKS[task][1]
    for ext in (".jsonl", ".json"):
        p = Path(data_dir) / task / f"{split}{ext}"
        if p.is_file():
            return p
    return None


def _first_row(path: Path) -> dict:
    """The first record, read without lm-eval, so that a malformed file fails with its path in the message."""
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


def builtin_config_path(task: str) -> Path:
    """lm-eval's own YAML config for `task` (the installed lm-eval's)."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / TASKS[task][0]
    if not path.is_file():
        raise ImportError(f"this lm-eval has no built-in {task} task at {path}; lm-eval >= 0.4 is expected")
    return path


def write_task_yaml(directory: Path, task: str, path: Path, cache_dir: str | None = None) -> Path:
    """A task config for lm-eval's include path: its built-in `task`, scoring the local file `path`."""
    split = TASKS[task][1]
    kwargs = {"data_files": {split: str(path)}, **({"cache_dir": cache_dir} if cache_dir else {})}
    lines = [f"include: {json.dumps(str(builtin_config_path(task)))}", f"task: {task}",
             "dataset_path: json", "dataset_name: null", f"dataset_kwargs: {json.dumps(kwargs)}"]
    lines += [f"{s}_split: {split if s == split else 'null'}" for s in ("training", "validation", "test")]
    out = Path(directory) / f"{task}.yaml"
    out.write_text("\n".join(lines) + "\n")
    return out


@contextmanager
def _quiet_run(progress: bool):
    """lm-eval bootstraps perplexity's stderr in a multiprocessing pool: forking a process that holds a
    model and OpenMP threads is slow and can hang, and the serial loop is quick (DISABLE_MULTIPROC, for
    the block only).  Without progress, datasets' bars are silenced too (lm-eval's own cannot be)."""
    import datasets

    shown = not datasets.are_progress_bars_disabled()
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old
        if shown:
            datasets.enable_progress_bars()


def evaluate_zero_shot(model, tokenizer, tasks=DEFAULT_TASKS, data_dir=None, limit: int | None = None,
                       batch_size: int = 1, progress: bool = True, bootstrap_iters: int = 1000) -> dict:
    """Zero-shot accuracy of `model` on `tasks` read from `data_dir` (see the module docstring).

    model: a transformers causal LM, or `torch.compile` of one (lm-eval's HFLM calls it as
    `model(input_ids).logits`).  limit: score only the first `limit` rows of each task (quick runs;
    reported in the result).

    Returns {"tasks": {task: {"acc", "acc_stderr", "acc_norm"?, "acc_norm_stderr"?, "perplexity"?,
    "samples", "file"}}, "missing": {task: reason}, "average": {"acc", "acc_norm", "tasks"}, "limit",
    "data_dir"}.  "average" is the mean over the tasks that ran; its acc_norm takes a task's acc where
    lm-eval gives no acc_norm (lambada_openai, winogrande), as zero-shot tables usually do.
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    tasks = [t.strip() for t in tasks]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {', '.join(unknown)}; supported: {', '.join(TASKS)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive row count, got {limit}")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers causal LM (or torch.compile of one), got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("zero-shot evaluation needs the model's tokenizer")
    root = find_data_dir(data_dir)
    result = {"tasks": {}, "missing": {}, "average": {}, "limit": limit, "data_dir": str(root) if root else None}
    files = {}
    for t in tasks:
        path = task_file(root, t) if root is not None else None
        if path is None:
            split = TASKS[t][1]
            where = (f"no {t}/{split}.jsonl or {t}/{split}.json under {root}" if root is not None
                     else "no data directory (pass data_dir / --data-dir or set FQ_DATA_DIR)")
            result["missing"][t] = where
            print(f"zero-shot: {t} missing ({where})")
            continue
        absent = [f for f in TASKS[t][2] if f not in _first_row(path)]
        if absent:
            raise ValueError(f"{path}: rows lack the field(s) {', '.join(absent)} of the {t} data set "
                             f"(expected {', '.join(TASKS[t][2])})")
        files[t] = path
    if not files:
        result["average"] = {"acc": None, "acc_norm": None, "tasks": []}
        return result

    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("zero-shot evaluation needs lm-evaluation-harness: pip install 'fq-compile[eval]' "
                          "(or pip install lm-eval)") from None

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="fq_zeroshot_") as tmp, _quiet_run(progress):
        configs, cache = Path(tmp) / "tasks", str(Path(tmp) / "datasets")
        configs.mkdir()
        for t, p in files.items():
            write_task_yaml(configs, t, p, cache_dir=cache)
        manager = TaskManager(include_path=str(configs), include_defaults=False)   # skip indexing ~10k YAMLs
        out = simple_evaluate(model=lm, tasks=list(files), num_fewshot=0, limit=limit,
                              bootstrap_iters=bootstrap_iters, task_manager=manager, log_samples=False)
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
