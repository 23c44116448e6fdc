"""Deep-Z engine: model, DPMs, optics simulator, training, evaluation and inference runtimes."""
