"""Training an adapter on a generated task with HF Trainer, chunk-wise when asked."""
