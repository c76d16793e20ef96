"""Inference: generation with a KV cache (`plinth.infer.sampling.generate`)."""
