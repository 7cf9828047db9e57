"""Training loops: stage 1 (decoder) and stage 2 (prompt learner, projection, LoRA)."""
