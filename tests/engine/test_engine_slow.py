"""The real bundled SmolLM2-135M-Instruct through the engine (marked slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemtinker import DEFAULT_MODEL
from gemtinker.engine import AdamConfig, Engine, LoraSpec, SamplingConfig, TrainDatum


@pytest.mark.slow
def test_real_model_answers_and_trains_one_step():
    eng = Engine()
    try:
        assert eng.base_model == DEFAULT_MODEL
        tok = eng.tokenizer
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=True
        )
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        base = eng.base_sampler()
        res = eng.sample(base, prompt, 1, SamplingConfig(max_tokens=24, temperature=0.0))
        seq = res.sequences[0]
        answer = tok.decode(seq.tokens)
        assert "5" in answer, answer

        eng.create_adapter("slow", LoraSpec(rank=8, seed=0))
        full = prompt + seq.tokens
        d = TrainDatum(
            np.array(full[:-1]),
            {"target_tokens": np.array(full[1:]), "logprobs": np.array([0.0] * (len(prompt) - 1) + seq.logprobs,
                                                                        np.float32),
             "advantages": np.array([0.0] * (len(prompt) - 1) + [1.0] * len(seq.tokens), np.float32)},
        )
        out = eng.forward_backward("slow", [d], "importance_sampling")
        # Fresh LoRA (B = 0) equals the base model: sampler and trainer logprobs agree, to float
        # rounding in fp32, to bf16 noise (no bias) where the learner picked bf16 (train dtype auto).
        learner_lp = out.outputs[0]["logprobs"][len(prompt) - 1:]
        if eng.train_dtype == torch.float32:
            np.testing.assert_allclose(learner_lp, seq.logprobs, atol=1e-3)
        else:
            gap = learner_lp - np.array(seq.logprobs)
            assert np.abs(gap).mean() < 0.05 and abs(gap.mean()) < 0.02, gap
        m = eng.optim_step("slow", AdamConfig(learning_rate=1e-4))
        assert m["grad_norm"] > 0
        after = eng.forward("slow", [d], "importance_sampling")
        assert after.metrics["loss:sum"] < out.metrics["loss:sum"]
    finally:
        eng.close()
