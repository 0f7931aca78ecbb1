"""Held-out evaluation: `summary` (episodes on fixed seeds -> return and success with confidence
intervals, shared with the trainer) and `run` (`gemtinker eval`: a checkpoint or base model on N
episodes). Depends on the shared rollout, run-file and tokenizer modules only, not on a trainer.
"""
