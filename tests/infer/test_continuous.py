"""Continuous batching (Engine.session): a row that joins a running decode loop produces what
it would alone with Engine.generate (tokens exactly, logprobs within 1e-5), for prompts shorter
and longer than the batch's cache position, greedy and seeded, and the rows already running are
unaffected.

    OMP_NUM_THREADS=1 python -m pytest tests/infer/test_continuous.py -q
"""

from __future__ import annotations

import pytest
from infer_helpers import tiny_engine

from plinth.errors import NotSupportedError, UsageError
from plinth.infer.engine import SamplingParams

RUNNING = [[5, 9, 13, 2, 40, 41, 7, 8, 30], [11, 4]]
JOINING = [
    [50, 20],  # shorter than the position it joins at
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4],  # longer
    [7] * 13,  # longer than the position of the first join, shorter than that of the second
]


def _params(kind: str, n: int, seed: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(max_new_tokens=n, logprobs=2)
    return SamplingParams(max_new_tokens=n, temperature=0.9, top_k=20, top_p=0.95, seed=seed,
                          repetition_penalty=1.2, frequency_penalty=0.3, logprobs=0)


def _close(a, b):
    assert a.token_ids == b.token_ids
    assert a.finish_reason == b.finish_reason and a.text == b.text
    assert len(a.logprobs) == len(b.logprobs)
    assert all(abs(x - y) < 1e-5 for x, y in zip(a.logprobs, b.logprobs, strict=True))
    if b.top_logprobs is not None:
        for x, y in zip(a.top_logprobs, b.top_logprobs, strict=True):
            assert x.keys() == y.keys()
            assert all(abs(x[k] - y[k]) < 1e-5 for k in x)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_rows_joining_mid_decode_equal_their_solo_generation(kind, fast):
    eng = tiny_engine(n_kv_heads=2)
    eng.use_fast = fast
    news = [30, 22, 9, 12, 20]
    prompts = RUNNING + JOINING
    params = [_params(kind, n, 100 + i) for i, n in enumerate(news)]
    solo = [eng.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]

    streamed: dict[int, str] = {}

    def on_token(row, tok, text):
        streamed[row] = streamed.get(row, "") + text

    s = eng.session(max_rows=8)
    handles = [s.add(p, sp, on_token) for p, sp in zip(RUNNING, params[:2], strict=True)]
    done: dict[int, object] = {}
    for _ in range(4):
        done.update(s.step())
    assert s.runner.cache.pos == 9 + 4  # the longest running row: 9 prompt + 4 fed tokens
    handles += [s.add(JOINING[0], params[2], on_token), s.add(JOINING[1], params[3], on_token)]
    for _ in range(5):
        done.update(s.step())
    assert s.live == 4 and s.runner.cache.pos == 24 + 5  # shifted right by the long prompt
    handles.append(s.add(JOINING[2], params[4], on_token))
    while s.live:
        done.update(s.step())
    assert s.runner is None  # an empty session holds no cache
    for h, ref in zip(handles, solo, strict=True):
        _close(done[h], ref)
        assert streamed[h] == ref.text


def test_a_session_with_all_rows_added_first_is_generate():
    eng = tiny_engine()
    params = [SamplingParams(max_new_tokens=n, logprobs=1) for n in (5, 17, 11, 2, 8)]
    prompts = RUNNING + JOINING
    ref = eng.generate(prompts, params)
    s = eng.session()
    hs = [s.add(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done = {}
    while s.live:
        done.update(s.step())
    for h, r in zip(hs, ref, strict=True):
        _close(done[h], r)


def test_cancel_stop_and_capacity_in_a_session():
    eng = tiny_engine()
    s = eng.session(max_rows=2)
    long = s.add(JOINING[1], SamplingParams(max_new_tokens=64 - 24))  # fills the context
    cancel = s.add([11], SamplingParams(max_new_tokens=30), lambda r, t, x: False)
    with pytest.raises(UsageError, match="full"):
        s.add([4], SamplingParams(4))
    out = dict(s.step())
    assert out[cancel].finish_reason == "cancelled" and len(out[cancel].token_ids) == 1
    with pytest.raises(UsageError, match="outside the vocabulary"):
        s.add([5, 10_000], SamplingParams(4))
    with pytest.raises(UsageError, match="more than this model's context"):
        s.add([5] * 60, SamplingParams(5))
    h = s.add([5] * 50, SamplingParams(14))  # longer than the running row's position
    done = {}
    while s.live:
        done.update(s.step())
    assert done[long].token_ids == eng.generate([JOINING[1]], SamplingParams(40))[0].token_ids
    assert done[h].token_ids == eng.generate([[5] * 50], SamplingParams(14))[0].token_ids
    # the cache never outgrows what the live rows can still write
    assert s.runner is None


def test_an_encoder_decoder_session_is_joined_only_when_empty():
    eng = tiny_engine(arch="encoder_decoder", n_decoder_layers=1, n_kv_heads=2)
    s = eng.session()
    s.add([5, 9, 13], SamplingParams(4))
    assert s.joinable
    s.step()
    assert not s.joinable
    with pytest.raises(NotSupportedError):
        s.add([11], SamplingParams(3))
    while s.live:
        s.step()
    assert s.joinable
