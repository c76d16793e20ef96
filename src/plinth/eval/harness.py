"""plinth models as an EleutherAI lm-evaluation-harness `LM`, so lm-eval's tasks run on them.

    plinth eval runs/quickstart --lm-eval my_task.yaml
    plinth eval ref-smollm2 --lm-eval my_task --lm-eval-include my_tasks/ --limit 20

    import lm_eval, plinth.eval.harness                      # registers the model "plinth"
    lm_eval.simple_evaluate(model="plinth", model_args="model=runs/quickstart",
                            tasks=["my_task.yaml"])

    # lm-eval's own command line, with the model "plinth" registered (lm-eval 0.4 has no
    # plugin entry points, so plain `lm_eval --model plinth` cannot find it):
    python -m plinth.eval.harness --model plinth --model_args model=runs/quickstart \
        --tasks my_task --include_path my_tasks/          # or: plinth-lm-eval ...

`PlinthLM` answers lm-eval's three request types with plinth's own scoring code, so both
harnesses give the same numbers on the same task:

- loglikelihood: plinth.eval.scoring.encode_pair + loglikelihoods (batched; the context is cut
  from the left when context + continuation exceed the model's context, like lm-eval's HF model);
- loglikelihood_rolling: the document after an end-of-text token, scored with plinth.eval.lm's
  sliding windows (every token once; window = the model's context, stride = `stride` or the
  window). lm-eval's HF model gives the last window a full context instead, so a document
  longer than the context can score slightly differently there;
- generate_until: plinth.infer.sampling.generate (greedy unless do_sample / temperature > 0),
  prompts batched per task and generation settings, the text cut at the first `until` string
  and before the end-of-text token.

lm-eval is an optional dependency (`pip install "plinth[eval]"`), imported only by this module.
lm-eval runs started from plinth set HF_DATASETS_OFFLINE / HF_HUB_OFFLINE (unless already set):
tasks read local files (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`) or the
Hugging Face datasets cache, never the network.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from plinth.errors import UsageError
from plinth.eval.scoring import EvalModel, TaskResult, encode_pair, loglikelihoods

INSTALL_HINT = 'pip install "plinth[eval]"'

try:  # lm-eval is optional: without it PlinthLM / run_lm_eval raise require_lm_eval's error
    import lm_eval.models  # noqa: F401  (its lazy model table first, so "hf" etc. still resolve)
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model
except ImportError:
    _LMBase = object

    def _register_model(*names):
        return lambda cls: cls


def require_lm_eval():
    """The lm_eval package, or a UsageError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError as e:
        raise UsageError(
            f"the lm-eval-harness adapter needs the lm-eval package, which is not installed "
            f"({e}). Install it with `{INSTALL_HINT}` (or `pip install lm-eval`), then run "
            "the command again."
        ) from None
    return lm_eval


class PlinthLM(_LMBase):
    """A plinth decoder as an lm-eval LM.

    `model` is a run / checkpoint / `plinth import` / Hugging Face directory, a .gguf file or a
    reference name (ref-smollm2), loaded with plinth.eval.scoring.load_eval_model, or an
    EvalModel already in memory. `batch_size` is sequences per forward pass; `max_length`
    lowers the context the model reads; `stride` is the sliding-window stride of
    loglikelihood_rolling (default: the window); `chat` loads the model's chat template for
    lm-eval's --apply_chat_template; `seed` seeds sampled generation.
    """

    def __init__(
        self,
        model: str | EvalModel | None = None,
        device: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        stride: int | str | None = None,
        chat: bool | str = False,
        seed: int | str = 1234,
        max_batch_size: Any = None,  # lm-eval passes it for "auto" batch sizes; unused here
        **unknown: Any,
    ) -> None:
        require_lm_eval()
        super().__init__()
        if unknown:
            warnings.warn(
                f"plinth lm-eval model: ignoring unknown model args {sorted(unknown)} (known: "
                "model, device, batch_size, max_length, stride, chat, seed)",
                stacklevel=2,
            )
        if model is None:
            raise UsageError(
                "the plinth lm-eval model needs model=PATH (a run, checkpoint or imported "
                "directory, or ref-smollm2), e.g. --model plinth --model_args model=runs/x"
            )
        if isinstance(model, EvalModel):
            if max_length is not None:
                model.max_len = min(int(max_length), model.max_len)
            self.lm = model
        else:
            from plinth.eval.scoring import load_eval_model

            self.lm = load_eval_model(
                str(model),
                device=_device(device),
                max_len=None if max_length is None else int(max_length),
                chat=_as_bool(chat),
            )
        self.lm.model.eval()
        self.batch_size = _batch_size(batch_size)
        self.stride = None if stride is None else int(stride)
        self.seed = int(seed)
        self._device = next(self.lm.model.parameters()).device
        # per lm-eval task name: requests cut to fit the context, seconds of model time
        self.truncated: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`model=PATH,batch_size=4,...` (lm-eval's --model_args)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """The model from --model_args (a dict) and lm-eval's own settings (batch_size, device:
        its CLI always sends them, defaults included); a --model_args value wins."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def max_length(self) -> int:
        return self.lm.max_len

    @property
    def eot_token_id(self) -> int | None:
        return self.lm.eos_id

    @property
    def tokenizer_name(self) -> str:  # fingerprints lm-eval's request cache with chat templates
        return f"plinth:{self.lm.name}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return None if self.lm.chat is None else "plinth"

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self.lm.chat is None:
            raise UsageError(
                f"{self.lm.name}: lm-eval asked for the chat template, but the model was loaded "
                "without one; pass chat=True in the model args (plinth eval: --chat)"
            )
        return self.lm.chat.render(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- requests -----------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is the greedy choice) per request."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for task, idx in _by_task(requests).items():
            t0 = time.perf_counter()
            pairs = [encode_pair(self.lm, *requests[i].args) for i in idx]
            scored, truncated = loglikelihoods(self.lm, pairs, batch_size=self.batch_size)
            for i, s in zip(idx, scored, strict=True):
                out[i] = (float(s[0]), bool(s[1]))
            self.truncated[task] += truncated
            self.seconds[task] += time.perf_counter() - t0
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(document) per request: every token scored once, the first after end-of-text."""
        from plinth.eval.lm import sequence_nlls

        if self.lm.eos_id is None:
            raise UsageError(
                f"{self.lm.name} has no end-of-text token to start documents from; "
                "loglikelihood_rolling (perplexity tasks) needs one"
            )
        window = self.lm.max_len
        stride = min(self.stride or window, window)
        out: list[float] = [0.0] * len(requests)
        for task, idx in _by_task(requests).items():
            t0 = time.perf_counter()
            seqs = [[self.lm.eos_id, *self.lm.encode(requests[i].args[0])] for i in idx]
            nlls = sequence_nlls(self.lm, seqs, window, stride, batch_size=self.batch_size)
            for i, (nll, _) in zip(idx, nlls, strict=True):
                out[i] = -nll
            self.seconds[task] += time.perf_counter() - t0
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generated text per (context, gen_kwargs) request, cut at the first `until` string."""
        out: list[str] = [""] * len(requests)
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):  # one generate call per task and settings
            groups[(r.task_name or "", repr(sorted(r.args[1].items())))].append(i)
        for (task, _), idx in groups.items():
            t0 = time.perf_counter()
            kw = _gen_settings(requests[idx[0]].args[1], self.lm.max_len)
            texts, truncated = self.generate(
                [requests[i].args[0] for i in idx], **kw
            )
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
            self.truncated[task] += truncated
            self.seconds[task] += time.perf_counter() - t0
        return out

    def generate(
        self,
        contexts: list[str],
        until: list[str] = (),
        max_gen_toks: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> tuple[list[str], int]:
        """(texts, prompts cut from the left) for prompts sharing one set of settings."""
        import torch

        from plinth.eval.scoring import cut_at_stop
        from plinth.infer.sampling import generate

        lm = self.lm
        room = lm.max_len - max_gen_toks
        prompts, truncated = [], 0
        for ctx in contexts:
            ids = lm.encode(ctx)
            if not ids:
                if lm.eos_id is None:
                    raise UsageError("an empty prompt needs an end-of-text token to start from")
                ids = [lm.eos_id]
            if len(ids) > room:
                ids, truncated = ids[-room:], truncated + 1
            prompts.append(ids)
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self._device).manual_seed(self.seed)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts = [""] * len(prompts)
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            with torch.no_grad():
                rows = generate(
                    lm.model, [prompts[i] for i in chunk], max_new_tokens=max_gen_toks,
                    temperature=temperature, top_k=top_k, top_p=top_p, eos_id=lm.eos_id,
                    generator=gen,
                )
            for i, row in zip(chunk, rows, strict=True):
                if lm.eos_id is not None and row and row[-1] == lm.eos_id:
                    row = row[:-1]  # the text ends before end-of-text (lm-eval stops there)
                texts[i] = cut_at_stop(lm.decode(row), list(until))
        return texts, truncated


if __name__ != "__main__":  # `python -m plinth.eval.harness` registers the module's own class
    _register_model("plinth")(PlinthLM)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's own command line with the model "plinth" registered: lm-eval 0.4 finds models
    only in its own table (no plugin entry points), so `lm_eval --model plinth` cannot find it;
    this runs the same CLI after importing plinth's adapter.

        python -m plinth.eval.harness --model plinth --model_args model=runs/x --tasks T.yaml
        plinth-lm-eval run --model plinth --model_args model=ref-smollm2 --tasks my_task \\
            --include_path my_tasks/ --limit 20

    Every argument is lm-eval's (`lm_eval --help`). Bad plinth input (a model that does not
    load, ...) exits 2 with plinth's message."""
    from plinth.errors import PlinthError

    try:
        require_lm_eval()
        import importlib

        importlib.import_module("plinth.eval.harness")  # registers "plinth" (this may be __main__)
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
        cli_evaluate()
    except PlinthError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    return 0


def _device(device: str | None) -> str:
    """The device to load on: lm-eval's CLI sends --device cuda unless told otherwise, so
    cuda without a GPU means the CPU (with a warning), as lm-eval's own HF model does."""
    import torch

    if not device:
        return "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"plinth lm-eval model: device {device!r} asked for, but no CUDA device "
                      "is available; running on the CPU", stacklevel=3)
        return "cpu"
    return str(device)


def _as_bool(v: bool | str) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")


def _batch_size(v: int | str | None) -> int:
    if v is None or v == "auto":  # lm-eval's "auto" probes memory; a fixed size here
        return 8
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise UsageError(f"batch_size must be a positive integer, got {v!r}")
    return n


def _by_task(requests) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.task_name or ""].append(i)
    return groups


def _gen_settings(gen_kwargs: dict, max_len: int) -> dict:
    """lm-eval's generation_kwargs as PlinthLM.generate arguments: `until` (a string or list),
    max_gen_toks (or max_new_tokens / max_tokens), do_sample + temperature, top_k, top_p."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    n = next(
        (kw.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kw), 256
    )
    n = int(n)
    if n >= max_len:  # lm-eval's default (256) can exceed a small model's whole context
        warnings.warn(
            f"max_gen_toks={n} leaves no room for a prompt in the model's {max_len}-token "
            f"context; generating at most {max_len // 2} tokens",
            stacklevel=3,
        )
        n = max(1, max_len // 2)
    do_sample = kw.pop("do_sample", None)
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    if do_sample is not None and not _as_bool(do_sample):
        temperature = 0.0
    elif do_sample is not None and temperature == 0.0:
        temperature = 1.0  # do_sample with no temperature: sample from the model as it is
    top_k = kw.pop("top_k", None)
    top_p = kw.pop("top_p", None)
    return {
        "until": until, "max_gen_toks": n, "temperature": temperature,
        "top_k": None if top_k is None else int(top_k),
        "top_p": None if top_p is None else float(top_p),
    }


# ---- running lm-eval tasks from plinth ----------------------------------------------------


@contextlib.contextmanager
def offline():
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE for the duration (a value the user set is kept):
    lm-eval tasks read local files or the datasets cache, never the network."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    for k, v in saved.items():
        if v is None:
            os.environ[k] = "1"
    patched = []
    # the libraries read these variables when first imported: set their flags too
    for mod, attr in (("datasets.config", "HF_HUB_OFFLINE"),
                      ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, attr) and saved["HF_HUB_OFFLINE"] is None:
            patched.append((m, attr, getattr(m, attr)))
            setattr(m, attr, True)
    try:
        yield
    finally:
        for m, attr, v in patched:
            setattr(m, attr, v)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def task_manager(names: list[str], include: list[str] = ()):
    """An lm-eval TaskManager that knows every name: the --lm-eval-include folders only when
    they (or YAML paths) cover the names, lm-eval's own task index (slow: ~10 s) otherwise.
    Unknown names fail here with a UsageError and the closest known names."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    for d in include:
        if not Path(d).is_dir():
            raise UsageError(f"--lm-eval-include {d}: not a directory of lm-eval task YAML files")
    for n in names:
        if Path(n).is_dir():
            raise UsageError(
                f"--lm-eval {n} is a directory; give it as --lm-eval-include {n} and name its "
                "tasks (or give task YAML file paths)"
            )
    inc = [str(d) for d in include] or None
    tm = TaskManager(include_defaults=False, include_path=inc)
    missing = [n for n in names if not Path(n).is_file() and n not in tm.all_tasks]
    if missing:
        tm = TaskManager(include_path=inc)
        missing = [n for n in missing if n not in tm.all_tasks]
    if missing:
        n = missing[0]
        close = difflib.get_close_matches(n, tm.all_tasks, n=3)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise UsageError(
            f"unknown lm-eval task {n!r}: not a task, group or tag of lm-eval "
            f"{getattr(lm_eval, '__version__', '')} or of --lm-eval-include, and no such YAML "
            f"file.{hint} A task of your own is a YAML file (give its path, or its folder with "
            "--lm-eval-include and its name); see docs/eval.md."
        )
    return tm


def run_lm_eval(
    lm: EvalModel | PlinthLM,
    tasks: list[str],
    include: list[str] = (),
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    chat: bool = False,
) -> tuple[list[TaskResult], dict]:
    """Run lm-eval tasks (names, groups, tags or YAML paths; commas separate several) on a
    plinth model: (one TaskResult per task and group, plinth's form; lm-eval's results dict)."""
    lm_eval = require_lm_eval()
    names = [s.strip() for spec in tasks for s in str(spec).split(",") if s.strip()]
    if not names:
        raise UsageError("--lm-eval: no task names given")
    model = lm if isinstance(lm, PlinthLM) else PlinthLM(lm, batch_size=batch_size)
    if chat and model.lm.chat is None:
        raise UsageError(
            f"{model.lm.name}: chat=True needs the model loaded with its chat template "
            "(load_eval_model(..., chat=True); plinth eval --chat does this)"
        )
    with offline():
        tm = task_manager(names, include)
        try:
            raw = lm_eval.simple_evaluate(
                model=model, tasks=names, num_fewshot=shots, limit=limit, task_manager=tm,
                log_samples=True, bootstrap_iters=0, apply_chat_template=chat,
                fewshot_as_multiturn=chat,
            )
        except Exception as e:  # data sets that are neither local nor cached
            if _is_offline_error(e):
                raise UsageError(
                    f"an lm-eval task could not load its data set ({type(e).__name__}: {e}). "
                    "lm-eval runs from plinth are offline (HF_DATASETS_OFFLINE=1): use a task "
                    "whose dataset_path is a local file (dataset_path: json, dataset_kwargs: "
                    "{data_files: PATH}) or a data set already in the Hugging Face cache."
                ) from None
            raise
    return to_task_results(raw, model, limit, chat), raw


def _is_offline_error(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    signs = ("offline", "connection", "couldn't reach", "on the hub", "datasetnotfound")
    return any(s in text for s in signs)


def _metric_name(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


_TYPES = {"multiple_choice": "multiple_choice", "generate_until": "generation"}


def to_task_results(
    raw: dict, model: PlinthLM | None = None, limit: int | None = None, chat: bool = False
) -> list[TaskResult]:
    """lm-eval's results dict as plinth TaskResults (metrics without stderr; per-sample
    log-likelihoods or predictions as examples)."""
    configs, out = raw.get("configs", {}), []
    for name, res in raw.get("results", {}).items():
        metrics = {
            _metric_name(k): float(v) for k, v in res.items()
            if k not in ("alias", "name", "sample_len") and "_stderr" not in k
            and isinstance(v, int | float)
            and not isinstance(v, bool)
        }
        cfg = configs.get(name)
        kind = _TYPES.get(cfg["output_type"], cfg["output_type"]) if cfg else "group"
        n = raw.get("n-samples", {}).get(name, {}).get("effective", 0)
        samples = raw.get("samples", {}).get(name, [])
        out.append(TaskResult(
            task=name, type=kind, metrics=metrics, n=int(n),
            shots=int(raw.get("n-shot", {}).get(name, 0) or 0), limit=limit,
            truncated=model.truncated.get(name, 0) if model else 0,
            seconds=model.seconds.get(name, 0.0) if model else 0.0,
            examples=[_example(s, kind, list(metrics)) for s in samples],
            chat=chat,
        ))
    return out


def _example(s: dict, kind: str, metric_names: list[str]) -> dict:
    ex: dict[str, Any] = {"index": s.get("doc_id"), "target": s.get("target")}
    resps = s.get("resps") or []
    if kind == "multiple_choice":
        ex["loglikelihoods"] = [float(r[0][0]) for r in resps]
    elif kind == "generation":
        filtered = s.get("filtered_resps") or []
        ex["prediction"] = filtered[0] if len(filtered) == 1 else filtered
    elif kind == "loglikelihood_rolling":
        ex["loglikelihood"] = float(resps[0][0]) if resps else None
    for m in metric_names:
        if m in s and isinstance(s[m], int | float):
            ex[m] = s[m]
    return ex


if __name__ == "__main__":
    sys.exit(main())
