"""GEM's `examples/train_tinker/tinker_train.py` entry point, backed by gemtinker.

    python -m examples.train_tinker.tinker_train env_id=game:Sudoku-v0-easy num_env=64 \
        max_tokens=1024 template=qwen3_game env_wrappers=concat

Same keys as GEM's script (model_name, batch_size, learning_rate, lora_rank, max_tokens, seed,
max_steps, save_every, env_id, num_env, env_wrappers, template, gamma, use_rebn, wandb_project,
wandb_name, log_dir) plus gemtinker's (resume, eval_every, ...); see `--help`.
"""

import sys

from gemtinker.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
