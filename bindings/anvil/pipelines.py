"""The pipelines from Python: ``anvil.lora``, ``anvil.train``, ``anvil.distill`` and ``anvil.quantize`` run the
recipes of the command line (``anvil lora`` ...) in this process, through the same C++ table, config resolution
and trainer (recipes/registry.h; bindings/pipelines.cpp), and return what the run produced.

    result = anvil.lora({"model": {"path": "..."}, "data": {...}}, progress=print)
    result = anvil.lora(overrides={"train.steps": 20})        # the embedded demo, 20 steps
    result.metrics[-1]["val_loss"], result.out_dir

A config is a dict (the JSON of ``--config``), a path to a JSON file, or None for the recipe's embedded demo;
``overrides`` maps "section.key" to a value, as ``--section.key=value`` does. ``progress(report)`` is called on
every logged step (output.log_every) with a dict: step, total_steps, loss, lr, grad_norm, the loss's terms (kd,
ce, ...), tokens, tokens_per_s, elapsed_s, peak_mem_gib (CUDA); without it the C++ progress line goes to stderr.
A bad config raises ValueError naming the key; a run that fails (a non-finite loss, out of memory) raises
:class:`RunError` with the message the command line prints; Ctrl-C saves a checkpoint and raises
KeyboardInterrupt saying how to resume (``resume=True``).
"""
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from . import _C

Config = Union[None, str, os.PathLike, Mapping[str, Any]]

_EXIT_OK, _EXIT_FAILED, _EXIT_INTERRUPTED = 0, 1, 130


class RunError(RuntimeError):
    """A run that stopped with a failure (exit status 1 of the command line): a non-finite loss, out of memory.
    ``message`` is what the command line prints (what to lower, which checkpoint resumes); ``result`` is the
    :class:`RunResult` of the steps before the stop."""

    def __init__(self, message, result):
        super().__init__(message)
        self.message, self.result = message, result


@dataclass
class RunResult:
    """What a pipeline run produced.

    recipe: "lora", "train", "distill", "quantize"; status: "finished" or "dry-run"; out_dir: output.dir;
    config: the resolved config (every key, defaults filled in: what output.dir/config.json holds);
    steps: the progress reports seen (the dicts ``progress`` was given); metrics: output.dir/metrics.jsonl's
    lines (training steps and validation: "val_loss", "val_kl", ...), empty for quantize and a dry run;
    report: anvil quantize's report.json (per-layer errors, perplexity and KL to the original), else None."""
    recipe: str
    status: str
    out_dir: str
    config: dict
    steps: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    report: Optional[dict] = None

    @property
    def val_losses(self):
        """The validation losses in metrics.jsonl, in step order."""
        return [m["val_loss"] for m in self.metrics if "val_loss" in m]


def _config_json(recipe, config):
    if config is None:
        return ""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise FileNotFoundError(f"anvil.{recipe}: config: cannot read {path}: {e.strerror}") from None
        return text
    if not isinstance(config, Mapping):
        raise TypeError(f"anvil.{recipe}: config must be a dict, a path to a JSON file or None (the embedded demo), "
                        f"got {type(config).__name__}")
    try:
        return json.dumps(config)
    except TypeError as e:
        raise TypeError(f"anvil.{recipe}: config must hold JSON values only: {e}") from None


def _override_list(recipe, overrides):
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise TypeError(f"anvil.{recipe}: overrides must map 'section.key' to a value, got {type(overrides).__name__}")
    out = []
    for key, value in overrides.items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise ValueError(f"anvil.{recipe}: overrides: key {key!r} must have the form 'section.key'")
        out.append(f"{key}={json.dumps(value)}")
    return out


def _read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def resolve_config(recipe: str, config: Config = None, overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The resolved config of ``recipe`` (as ``anvil <recipe> --print-config``): every key, defaults filled in;
    ValueError names a bad key or value."""
    text = _C.resolve_recipe_config(recipe, _config_json(recipe, config), _override_list(recipe, overrides),
                                    "")
    return json.loads(text)


def run(recipe: str, config: Config = None, *, overrides: Optional[Mapping[str, Any]] = None,
        progress: Optional[Callable[[dict], None]] = None, resume: bool = False, dry_run: bool = False) -> RunResult:
    """Runs ``recipe`` (one of :func:`recipes`) as ``anvil <recipe>`` does; the functions named after the recipes
    call this. See the module's docstring for the arguments."""
    if progress is not None and not callable(progress):
        raise TypeError(f"anvil.{recipe}: progress must be callable (it is given each step's report), "
                        f"got {type(progress).__name__}")
    steps = []

    def seen(report):
        steps.append(report)
        if progress is not None:
            progress(report)

    out = _C.run_recipe(recipe, _config_json(recipe, config), _override_list(recipe, overrides), resume, dry_run,
                        seen, "")
    resolved = json.loads(out["config"])
    out_dir = resolved.get("output", {}).get("dir", "")
    report_path = os.path.join(out_dir, "report.json")
    report = None
    if recipe == "quantize" and not dry_run and os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    metrics = [] if recipe == "quantize" or dry_run else _read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    result = RunResult(recipe=recipe, status="dry-run" if dry_run else "finished", out_dir=out_dir,
                       config=resolved, steps=steps, metrics=metrics, report=report)
    if out["status"] == _EXIT_INTERRUPTED:
        raise KeyboardInterrupt(out["message"].replace("resume with: ", "resume with resume=True, or: "))
    if out["status"] != _EXIT_OK:
        raise RunError(out["message"] or f"anvil.{recipe}: the run failed (exit status {out['status']})", result)
    return result


def recipes():
    """The recipes' names, as ``anvil`` lists them."""
    return list(_C.recipe_names())


def lora(config: Config = None, **kwargs) -> RunResult:
    """LoRA fine-tuning (``anvil lora``): the adapter in PEFT's format in output.dir/adapter."""
    return run("lora", config, **kwargs)


def train(config: Config = None, **kwargs) -> RunResult:
    """Training every parameter (``anvil train``); there is no embedded demo: a config is required."""
    return run("train", config, **kwargs)


def distill(config: Config = None, **kwargs) -> RunResult:
    """Distillation of a teacher into a smaller student (``anvil distill``): the student as a HF folder."""
    return run("distill", config, **kwargs)


def quantize(config: Config = None, **kwargs) -> RunResult:
    """Quantization and export (``anvil quantize``): the quantized checkpoint in output.dir and its report."""
    return run("quantize", config, **kwargs)
