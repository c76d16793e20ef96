"""`plinth generate`: text from a trained run, checkpoint, imported or reference model, through
the inference engine (plinth.infer.engine): one prompt or a JSONL file of them, batched.

plinth generate runs/quickstart --prompt "def " --max-new-tokens 64 --temperature 0
plinth generate ref-smollm2 --prompts-file prompts.jsonl --output out.jsonl --quantize int8
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plinth.errors import UsageError


def generate_cmd(
    model: str,
    *,
    prompt: list[str] = (),
    prompts_file: str | None = None,
    output: str | None = None,
    chat: bool = False,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    stop: list[str] = (),
    stop_token_ids: list[int] = (),
    ignore_eos: bool = False,
    seed: int = 0,
    logprobs: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    num_return_sequences: int = 1,
    batch_size: int = 8,
    quantize: str | None = None,
    adapter: str | None = None,
    no_merge_adapter: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    no_progress: bool = False,
) -> int:
    """Generate text from a model: a plinth run (its latest checkpoint), a checkpoint, a `plinth
    import` directory, a Hugging Face directory, a .gguf file or a reference model (ref-smollm2).

    Decoding defaults come from the run's `inference` config section; flags override them.
    With --prompts-file, prompts are read from a JSONL file and generated in batches (a progress
    bar on stderr); results go to --output (JSONL, one row per input row) or stdout.

    Args:
        model: run directory, checkpoint directory, model directory, .gguf file or reference
            model name
        prompt: one or more prompts; each gets its own continuation
        prompts_file: JSONL file, one row per prompt: {"prompt": "..."} (completion) or
            {"messages": [{"role": ..., "content": ...}, ...]} (through the chat template);
            other keys are copied to the output
        output: JSONL file for the results of --prompts-file (default: stdout)
        chat: send each --prompt as a user turn through the model's chat template (its own, or
            its fine-tuning base's), as instruction-tuned models expect
        max_new_tokens: tokens to generate per prompt
        temperature: 0 is greedy; higher is more random
        top_k: sample only among the k most likely tokens
        top_p: nucleus sampling probability mass
        min_p: keep only tokens with probability >= min_p times the most likely one's
        repetition_penalty: > 1 discourages tokens already in the prompt or output (CTRL)
        frequency_penalty: subtract this times a token's count in the output from its logit
        presence_penalty: subtract this from the logit of every token already in the output
        stop: stop strings; generation ends before the first one (not included in the text)
        stop_token_ids: token ids that end generation (besides the model's eos)
        ignore_eos: keep generating after eos (exactly max_new_tokens tokens)
        seed: seed of each prompt's sampler (same prompt and seed, same text)
        logprobs: report each generated token's log-probability and the N most likely tokens'
            (0: the chosen token's only)
        num_beams: beam search with this many beams (> 1; deterministic, ignores sampling flags)
        length_penalty: beam search: score = sum of logprobs / length ** length_penalty
        early_stopping: beam search: stop a prompt once num_beams hypotheses have finished
        num_return_sequences: beam search: how many of the best hypotheses to return
        batch_size: prompts decoded together
        quantize: int8: weight-only int8 linear layers (a quarter of the weight bytes)
        adapter: LoRA/IA3 adapter directory to put on the model
        no_merge_adapter: apply the adapter on the fly instead of folding it into the weights
        device: cpu, cuda, cuda:1, ...
        dtype: fp32, bf16 or fp16 (float32, bfloat16, float16 also accepted); default: as stored
        no_progress: no progress bar for --prompts-file
    """

    from plinth.infer.engine import Engine, SamplingParams, weight_dtype
    from plinth.load import no_chat_template

    weight_dtype(dtype or "fp32")  # a bad --dtype is refused before the model loads
    _check_options(batch_size, num_beams, num_return_sequences, max_new_tokens, prompt,
                   prompts_file, output)
    rows = _read_prompts(Path(prompts_file)) if prompts_file is not None else None
    eng = Engine.load(model, device=device, dtype=dtype, quantize=quantize, adapter=adapter,
                      merge_adapter=not no_merge_adapter)
    params = SamplingParams.from_defaults(
        eng.cfg.inference,
        max_new_tokens=max_new_tokens or None,  # 0 too means the run's default
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        stop=list(stop),
        stop_token_ids=[int(t) for t in stop_token_ids],
        ignore_eos=ignore_eos,
        seed=seed,
        logprobs=logprobs,
    )
    if chat and eng.chat_template is None:
        raise no_chat_template(model)
    beams = Beams(num_beams, length_penalty, early_stopping, num_return_sequences)
    if rows is None:  # --prompt (or the run's sample prompts): printed
        prompts = list(prompt) or list(eng.cfg.tracking.sample_prompts)
        texts = [eng.apply_chat_template([{"role": "user", "content": p}]) if chat else p
                 for p in prompts]
        results = _run(eng, texts, params, beams, batch_size, progress=False,
                       fit_to_context=not max_new_tokens)
        _print_results(eng, prompts, results, chat, num_beams > 1)
        return 0
    texts = [eng.apply_chat_template(r["messages"]) if "messages" in r else r["prompt"]
             for r in rows]
    results = _run(eng, texts, params, beams, batch_size, progress=not no_progress,
                   fit_to_context=not max_new_tokens)
    _write_results(eng, rows, results, output, num_return_sequences > 1)
    return 0


def _check_options(batch_size, num_beams, num_return_sequences, max_new_tokens, prompt,
                   prompts_file, output) -> None:
    """Counts in range and options that go together, before the model loads (UsageError
    naming the flag)."""
    if prompts_file is not None and prompt:
        raise UsageError("give --prompt or --prompts-file, not both")
    if output is not None and prompts_file is None:
        raise UsageError("--output writes the results of --prompts-file; add --prompts-file")
    for flag, value in (("--batch-size", batch_size), ("--num-beams", num_beams),
                        ("--num-return-sequences", num_return_sequences)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if num_return_sequences > num_beams > 1:
        raise UsageError(f"--num-return-sequences {num_return_sequences} is more than "
                         f"--num-beams {num_beams}; beam search returns at most one sequence "
                         "per beam")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be at least 1 (0: the run's default), got "
                         f"{max_new_tokens}")


@dataclass
class Beams:
    """Beam-search settings of a generate command (num_beams == 1: no beam search)."""

    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_return_sequences: int = 1


def _print_results(eng, prompts: list[str], results, chat: bool, beam: bool) -> None:
    """Each prompt's completions on stdout (the prompt repeated unless it was a chat turn)."""
    import json

    for p, outs in zip(prompts, results, strict=True):
        for i, c in enumerate(outs):
            label = f" [beam {i + 1}, score {c.score:.4f}]" if beam else ""
            print(f"--- {p!r}{label}\n{c.text}" if chat else f"--- {p!r}{label}\n{p}{c.text}")
            if c.logprobs is not None:
                print(json.dumps(_logprob_fields(eng, c)))


def _write_results(eng, rows: list[dict], results, output: str | None, all_beams: bool) -> None:
    """One JSONL row per input row (its fields plus the completion) to `output` or stdout."""
    import json
    import sys

    out = open(output, "w") if output else sys.stdout  # noqa: SIM115
    try:
        for row, outs in zip(rows, results, strict=True):
            res = [{"text": c.text, "finish_reason": c.finish_reason,
                    "completion_tokens": len(c.token_ids), **_logprob_fields(eng, c),
                    **({"score": c.score} if c.score is not None else {})} for c in outs]
            rec = {**row, **res[0], "prompt_tokens": outs[0].prompt_tokens}
            if all_beams:
                rec["beams"] = res
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        if output:
            out.close()
    if output:
        print(f"wrote {len(rows)} rows to {output}", file=sys.stderr)


def _read_prompts(path: Path) -> list[dict]:
    """Rows of a prompts JSONL file, each with a "prompt" string or a "messages" list."""
    import json

    if not path.is_file():
        raise UsageError(f"--prompts-file {path}: no such file")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise UsageError(f"--prompts-file {path} holds NUL bytes: it looks like a binary file; "
                         'give a UTF-8 JSONL file, one {"prompt": "..."} per line')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts-file {path} is not UTF-8 text (byte {e.start + 1}); save "
                         "it as UTF-8") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise UsageError(f"{path} line {n}: not valid JSON ({getattr(e, 'msg', e)}); each "
                             'line must be one object like {"prompt": "..."}') from None
        ok = isinstance(row, dict) and (
            isinstance(row.get("prompt"), str)
            or (isinstance(row.get("messages"), list)
                and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str) for m in row["messages"])))
        if not ok:
            raise UsageError(
                f"{path} line {n}: each row needs \"prompt\" (a string) or \"messages\" (a "
                'list of {"role": "...", "content": "..."} with text values); got ' + line[:80]
            )
        rows.append(row)
    if not rows:
        raise UsageError(f"--prompts-file {path} has no rows")
    return rows


def _run(eng, texts, params, beams: Beams, batch_size: int, progress: bool,
         fit_to_context: bool = False):
    """Completions (a list per prompt) in batches of prompts of similar length (less padding),
    returned in the input order. `fit_to_context`: a max_new_tokens the user did not choose (the
    run's default) is lowered to what the model's context leaves after the longest prompt."""
    if beams.num_beams < 1 or batch_size < 1:
        raise UsageError(f"--num-beams ({beams.num_beams}) and --batch-size ({batch_size}) "
                         "need >= 1")
    if beams.num_beams == 1 and beams.num_return_sequences != 1:
        raise UsageError("--num-return-sequences needs beam search (--num-beams > 1)")
    ids = [eng.encode(t) for t in texts]
    if fit_to_context:
        params = _fit_to_context(eng, ids, params)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    results: list = [None] * len(ids)
    bar = _Bar(len(ids), progress)
    with bar:
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            batch = [ids[i] for i in chunk]
            if beams.num_beams > 1:
                outs = eng.beam_search(batch, num_beams=beams.num_beams,
                                       length_penalty=beams.length_penalty,
                                       early_stopping=beams.early_stopping,
                                       max_new_tokens=params.max_new_tokens,
                                       num_return_sequences=beams.num_return_sequences)
            else:
                outs = [[c] for c in eng.generate(batch, params)]
            for i, o in zip(chunk, outs, strict=True):
                results[i] = o
            bar.advance(len(chunk), sum(len(o[0].token_ids) for o in outs))
    return results


def _fit_to_context(eng, ids: list[list[int]], params):
    """params with max_new_tokens lowered so a decoder's generation stops at its context."""
    import sys
    from dataclasses import replace

    room = eng.max_context - max(len(i) for i in ids)
    if eng.arch != "decoder" or not 1 <= room < params.max_new_tokens:
        return params
    print(f"note: generating at most {room} tokens: the default max_new_tokens="
          f"{params.max_new_tokens} (the run's inference.max_new_tokens) plus the prompt would "
          f"pass the model's context of {eng.max_context} tokens; --max-new-tokens sets it",
          file=sys.stderr)
    return replace(params, max_new_tokens=room)


def _logprob_fields(eng, c) -> dict:
    if c.logprobs is None:
        return {}
    ids = c.token_ids  # each token as the text it adds (as top_logprobs' keys are)
    out = {"tokens": [eng.token_text(t, ids[max(0, k - 6):k]) for k, t in enumerate(ids)],
           "logprobs": c.logprobs}
    if c.top_logprobs is not None:
        out["top_logprobs"] = c.top_logprobs
    return out


class _Bar:
    """A progress bar on stderr: prompts done, generated tokens/s."""

    def __init__(self, total: int, enabled: bool):
        import time

        from plinth.track.progress import TaskProgress

        self.tokens, self.t0 = 0, time.perf_counter()
        self.prog = TaskProgress(enabled)
        self.task = self.prog.task("generate", total)

    def __enter__(self):
        self.prog.__enter__()
        return self

    def __exit__(self, *exc):
        self.prog.__exit__(*exc)

    def advance(self, n: int, tokens: int) -> None:
        import time

        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.prog.update(self.task, advance=n, info=f"{rate:.1f} tokens/s")
