"""`plinth generate`: text from a trained run or checkpoint, with the KV cache.

plinth generate runs/quickstart --prompt "def " --max-new-tokens 64 --temperature 0
"""

from __future__ import annotations

from pathlib import Path

from plinth.errors import UsageError


def find_run(path: Path) -> tuple[Path, Path | None]:
    """(run directory, explicit weights directory or None) for a run dir, a checkpoint dir or
    an imported model dir (`plinth import`: config.yaml and model.safetensors side by side,
    plus import.json; it is its own weights directory)."""
    if (path / "config.yaml").is_file():
        if (path / "import.json").is_file() and (path / "model.safetensors").is_file():
            return path, path
        return path, None
    if (path / "model.safetensors").is_file() and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path
    raise UsageError(
        f"{path} is neither a plinth run directory (with config.yaml), a checkpoint "
        "directory (with model.safetensors, under RUN/checkpoints/) nor an imported model "
        "(`plinth import`). `plinth runs` lists runs."
    )


def load_trained(path: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer, config) from a run, checkpoint or imported directory."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from plinth.config.load import load_config
    from plinth.models import build_model
    from plinth.train import state as ckpt

    run, explicit = find_run(Path(path))
    cfg = load_config([run / "config.yaml"]).config
    if cfg.finetune.base is not None and explicit != run:  # a fine-tune: method + heads first
        from plinth.finetune import build_finetune_model

        model = build_finetune_model(cfg, None)
    else:
        model = build_model(cfg.model)
    if explicit == run:  # an imported model: plain weights, no training state
        ckpt.load_weights(model, load_file(str(run / ckpt.MODEL_FILE)))
    else:
        loaded = ckpt.load_checkpoint(explicit) if explicit else ckpt.load_latest(
            run / "checkpoints"
        )
        loaded.load_into(model)  # single file, or a sharded (DCP) checkpoint consolidated here
    model.to(torch.device(device)).eval()
    tok_path = run / "tokenizer.json"
    if not tok_path.is_file():
        raise UsageError(f"{run} has no tokenizer.json; was it written by an older plinth?")
    return model, Tokenizer.from_file(str(tok_path)), cfg


def generate_cmd(
    model: str,
    *,
    prompt: list[str] = (),
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    chat: bool = False,
) -> int:
    """Generate text from a trained or imported decoder (run, checkpoint or model directory).

    Decoding defaults come from the run's `inference` config section; flags override them.

    Args:
        model: run directory (uses its latest checkpoint), checkpoint directory, or a model
            directory written by `plinth import`
        prompt: one or more prompts; each gets its own continuation
        max_new_tokens: tokens to generate per prompt
        temperature: 0 is greedy; higher is more random
        top_k: sample only among the k most likely tokens
        top_p: nucleus sampling probability mass
        seed: seed for reproducible sampling
        chat: send each prompt as a user turn through the model's chat template (its own, or
            its fine-tuning base's), as instruction-tuned models expect
    """
    import torch

    from plinth.infer.sampling import generate

    net, tok, cfg = load_trained(model)
    if cfg.model.arch != "decoder":
        raise UsageError(f"{model} is an {cfg.model.arch} model; `plinth generate` needs a decoder")
    inf = cfg.inference
    prompts = list(prompt) or list(cfg.tracking.sample_prompts)
    eos = tok.token_to_id(cfg.data.tokenizer.special_tokens[0])
    if chat:
        from plinth.finetune.base import chat_template_for

        run, _ = find_run(Path(model))
        template = chat_template_for(model, run, cfg)
        texts = [template.render([{"role": "user", "content": p}], add_generation_prompt=True)
                 for p in prompts]
        ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    else:
        ids = [tok.encode(p).ids for p in prompts]
    outs = generate(
        net,
        ids,
        max_new_tokens=max_new_tokens or inf.max_new_tokens,
        temperature=inf.temperature if temperature is None else temperature,
        top_k=inf.top_k if top_k is None else top_k,
        top_p=inf.top_p if top_p is None else top_p,
        eos_id=eos,
        generator=torch.Generator().manual_seed(seed),
    )
    for p, o in zip(prompts, outs, strict=True):
        print(f"--- {p!r}\n{tok.decode(o)}" if chat else f"--- {p!r}\n{p}{tok.decode(o)}")
    return 0
