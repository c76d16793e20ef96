"""plinth serve's logprobs as OpenAI's: the official `openai` client against the real server, a
tiny model over a byte-level BPE tokenizer (the kind plinth trains), so tokens are text pieces
(" the", not the BPE piece "Ġthe"), `bytes` their UTF-8 bytes, top_logprobs named the same way
as the chosen tokens, and text_offset counting from the start of the prompt (OpenAI's legacy
completions), which indexes the echoed text."""

from __future__ import annotations

import pytest
from infer_helpers import tiny_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from plinth.config.schema import Config  # noqa: E402
from plinth.data.sft import ChatTemplate  # noqa: E402
from plinth.infer.engine import Engine  # noqa: E402
from plinth.infer.server import BackgroundServer, create_app  # noqa: E402

TEXT = ("the cat sat on the mat. the café served crème brûlée — naïve, über fine. " * 20)
PROMPT = "the cat sat on"


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel
                                  .alphabet(), special_tokens=["<eos>"])
    tok.train_from_iterator([TEXT], trainer)
    return tok


@pytest.fixture(scope="module")
def client():
    tok = bpe_tokenizer()
    model = tiny_model(vocab_size=tok.get_vocab_size(), max_seq_len=128)
    engine = Engine(model, tok, Config(model=model.cfg), eos_ids=[], name="bpe")
    with BackgroundServer(create_app(engine)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0), tok


def legacy_bytes(token: str) -> bytes:
    """A legacy logprobs token's bytes ("bytes:\\xe2\\x80" names part of a character)."""
    if token.startswith("bytes:"):
        return bytes(int(x, 16) for x in token[len("bytes:"):].split("\\x")[1:])
    return token.encode("utf-8")


def test_completion_logprobs_are_text_pieces_offset_from_the_prompt(client):
    c, tok = client
    pieces = {tok.id_to_token(i) for i in range(tok.get_vocab_size())}
    assert any(p.startswith("Ġ") for p in pieces)  # the BPE pieces the answer must not show
    r = c.completions.create(model="bpe", prompt=PROMPT, max_tokens=12, temperature=0,
                             logprobs=3)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert len(lp.tokens) == 12 and not any("Ġ" in t for t in lp.tokens), lp.tokens
    # text_offset counts from the start of the prompt: each token sits at its offset in the
    # echoed text (prompt + text), and the tokens' bytes add up to the text
    echoed = c.completions.create(model="bpe", prompt=PROMPT, max_tokens=12, temperature=0,
                                  echo=True).choices[0].text
    assert echoed == PROMPT + text
    assert lp.text_offset[0] == len(PROMPT)
    raw = b"".join(legacy_bytes(t) for t in lp.tokens)
    assert raw.decode("utf-8", errors="replace") == text
    for t, off in zip(lp.tokens, lp.text_offset, strict=True):
        if not t.startswith("bytes:"):
            assert echoed[off:off + len(t)] == t
    for t, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and top[t] == pytest.approx(chosen)  # greedy: the top one
        assert not any("Ġ" in k for k in top)


def test_sampled_logprob_tokens_spell_the_text(client):
    c, _ = client
    for seed in range(3):  # sampled: odd tokens too (parts of "é", "—")
        r = c.completions.create(model="bpe", prompt="the café", max_tokens=24,
                                 temperature=1.5, seed=seed, logprobs=2)
        lp = r.choices[0].logprobs
        raw = b"".join(legacy_bytes(t) for t in lp.tokens)
        assert raw.decode("utf-8", errors="replace") == r.choices[0].text
        assert lp.text_offset[0] == len("the café")


def test_chat_logprobs_tokens_and_bytes(tmp_path):
    tok = bpe_tokenizer()
    model = tiny_model(vocab_size=tok.get_vocab_size(), max_seq_len=128)
    tpl = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}", "", "<eos>")
    engine = Engine(model, tok, Config(model=model.cfg), eos_ids=[], name="bpe",
                    chat_template=tpl)
    with BackgroundServer(create_app(engine)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="bpe", max_tokens=16, temperature=1.0, seed=5,
                                      messages=[{"role": "user", "content": "the crème"}],
                                      logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 16
    assert not any("Ġ" in e.token for e in content)
    raw = b"".join(bytes(e.bytes) for e in content)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content
    for e in content:
        if "\ufffd" not in e.token:
            assert bytes(e.bytes) == e.token.encode("utf-8")
        assert len(e.top_logprobs) == 2 and not any("Ġ" in t.token for t in e.top_logprobs)
        for t in e.top_logprobs:
            if "\ufffd" not in t.token:
                assert bytes(t.bytes) == t.token.encode("utf-8")
