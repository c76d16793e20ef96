"""Inference: generating text from a model.

The engine (`plinth.infer.engine.Engine`: `plinth generate`, `chat`, `serve`) decodes a batch
of prompts, each with its own `SamplingParams`, in one loop over a preallocated KV cache:
- `params`: `SamplingParams` and `Completion`, what a caller asks and gets back;
- `session`: the decode loop (`DecodeSession`, rows join and leave between steps) and each
  row's state; `detok`: a row's incremental text, stop strings and streaming;
- `sampler`: per-row penalties, top-k/top-p/min-p and seeded draws as (rows, vocab) tensors;
- `runners`: the forward passes over the cache, through `fast` (the decoder's forward without
  module overhead) where it applies; `quant`: weight-only int8 layers and CPU kernels;
- `beam`: beam search;
- `server` and `scheduler`: the OpenAI-compatible HTTP server over continuous batching.

`sampling.generate` is the small generate that evaluation and training samples use (one set of
sampling settings, the model's own forward).
"""
