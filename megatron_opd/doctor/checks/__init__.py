"""The doctor's checks, one module each: cheap ones that read files and the config (vocab, temperature,
memory) and measured ones that run the models on a few real rows (self_test, teacher_loaded, engine,
topk_clamps)."""
