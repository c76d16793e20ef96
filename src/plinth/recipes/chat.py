"""`plinth chat`: talk to a model in the terminal, through its chat template, with the reply
streamed as it is generated.

plinth chat ref-smollm2
plinth chat runs/my-sft --temperature 0 --system "Answer in one sentence."
printf 'Hi!\\n/reset\\nWhat is 2+2?\\n' | plinth chat ref-smollm2     # scripted: stdin lines
"""

from __future__ import annotations

import sys

HELP = "/reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def chat_cmd(
    model: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
    device: str = "cpu",
) -> int:
    """Chat with a model interactively: each line you type is a user turn, the conversation is
    rendered by the model's chat template (its own, or its fine-tuning base's) and the reply is
    streamed to the terminal. The history is kept (oldest turns are dropped when it no longer
    fits the context). /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply.

    Args:
        model: run directory, checkpoint, model directory, .gguf file or reference model
            (ref-smollm2) with a chat template
        system: a system message put before the conversation
        max_new_tokens: longest reply, in tokens
        temperature: 0 is greedy (default: the run's inference.temperature)
        top_k: sample only among the k most likely tokens
        top_p: nucleus sampling probability mass
        min_p: keep only tokens with probability >= min_p times the most likely one's
        repetition_penalty: > 1 discourages repeating tokens (CTRL)
        seed: seed for reproducible replies (default: a fresh one)
        quantize: int8: weight-only int8 linear layers
        adapter: LoRA/IA3 adapter directory to put on the model (merged)
        device: cpu, cuda, ...
    """
    from plinth.infer.engine import Engine, SamplingParams
    from plinth.load import no_chat_template

    eng = Engine.load(model, device=device, quantize=quantize, adapter=adapter)
    if eng.chat_template is None:
        raise no_chat_template(model, "plinth chat")
    params = SamplingParams.from_defaults(
        eng.cfg.inference,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    tty = sys.stdin.isatty()
    print(f"chatting with {eng.name} ({HELP})", file=sys.stderr)
    turn = 0
    while True:
        if tty:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D / end of input
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            print("(conversation reset)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}: {HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        prompt = _fit(eng, history, start, params.max_new_tokens)
        if prompt is None:
            history.pop()
            print(f"(that message is too long for the context of {eng.max_context} tokens "
                  f"with max_new_tokens={params.max_new_tokens})", file=sys.stderr)
            continue
        if params.seed is not None:  # one reproducible stream per conversation, not per turn
            params.seed = (seed or 0) + turn
        turn += 1
        try:
            c = eng.generate([prompt], params, on_token=_print_delta)[0]
        except KeyboardInterrupt:
            print("\n(reply stopped)", file=sys.stderr)
            history.pop()
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": c.text})
    return 0


def _print_delta(row: int, token: int, delta: str) -> None:
    if delta:
        sys.stdout.write(delta)
        sys.stdout.flush()


def _fit(eng, history: list[dict], start: list[dict], new: int) -> list[int] | None:
    """Token ids of the rendered conversation, dropping the oldest turns (after the system
    message) until it fits the context with room for the reply; None when even the last
    message alone does not fit."""
    while True:
        ids = eng.encode(eng.apply_chat_template(history))
        if len(ids) + new <= eng.max_context:
            return ids
        if len(history) <= len(start) + 1:
            return None
        del history[len(start) : len(start) + 2]  # the oldest user turn and its reply
