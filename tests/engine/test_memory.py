"""Process memory: the model's frozen weights are pages of its file, which leave the process's
memory while only the sampler's (or the bf16 learner's) copies are read and come back unchanged;
oneDNN's primitive caches are bounded unless the user sized them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gemtinker.engine import Engine, LoraSpec, SamplingConfig, TrainDatum
from gemtinker.engine import memory
from gemtinker.engine.memory import MappedWeights
from gemtinker.engine.models import TINY_MODEL_NAME

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="Linux /proc only")


def _private_file_tensor(tmp_path, n: int = 4 * 4096) -> torch.Tensor:
    values = np.arange(n, dtype=np.float32)
    path = tmp_path / "w.bin"
    values.tofile(path)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))  # a private file mapping


def test_dropped_pages_read_back_from_the_file(tmp_path):
    t = _private_file_tensor(tmp_path)
    t.sum()  # read every page
    mapped = MappedWeights([t])
    assert mapped.nbytes > 0 and mapped.resident_bytes() == mapped.nbytes
    assert mapped.drop() == mapped.nbytes
    assert mapped.resident_bytes() == 0
    assert torch.equal(t, torch.arange(t.numel(), dtype=torch.float32))
    assert mapped.resident_bytes() == mapped.nbytes


def test_written_pages_are_kept(tmp_path):
    t = _private_file_tensor(tmp_path)
    t[5] = -1.0  # the page is now the process's own copy: dropping it would lose the write
    mapped = MappedWeights([t])
    assert mapped.drop() == 0 and "written" in mapped.refused
    assert t[5].item() == -1.0


def test_memory_not_from_a_file_is_left_alone():
    mapped = MappedWeights([torch.ones(100_000)])
    assert mapped.nbytes == 0 and mapped.drop() == 0


def _datums(vocab: int) -> list[TrainDatum]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(3):
        toks = rng.integers(0, vocab, 20)
        n = len(toks) - 1
        out.append(TrainDatum(toks[:-1], {"target_tokens": toks[1:], "logprobs": np.full(n, -5.0, np.float32),
                                          "advantages": np.ones(n, np.float32)}))
    return out


def _logprobs(eng: Engine, datums) -> np.ndarray:
    res = eng.forward_backward("a", datums, "importance_sampling")
    return np.concatenate([np.asarray(o["logprobs"]) for o in res.outputs])


@pytest.mark.parametrize("train_dtype", ["float32", "bfloat16"])
def test_model_weights_leave_memory_while_sampling(train_dtype):
    eng = Engine(TINY_MODEL_NAME, device="cpu", dtype="float32", train_dtype=train_dtype)
    try:
        eng.create_adapter("a", LoraSpec(rank=4, seed=3))
        linears = eng._mapped_linears
        assert linears.nbytes > 0, "the tiny model's weights are expected to be views of its file"
        datums = _datums(eng.vocab_size)
        before = _logprobs(eng, datums)
        # fp32 reads the linears; a bf16 learner reads only its copies, made before it dropped them
        assert linears.resident_bytes() == (linears.nbytes if train_dtype == "float32" else 0)
        sid = eng.snapshot_sampler("a")
        eng.sample(sid, [1, 2, 3], 1, SamplingConfig(max_tokens=4, temperature=1.0, seed=0))
        assert linears.resident_bytes() == 0  # the sampler runs on its packed copies
        assert eng._mapped_all.resident_bytes() < eng._mapped_all.nbytes
        np.testing.assert_array_equal(_logprobs(eng, datums), before)
    finally:
        eng.close()


def test_primitive_caches_are_bounded_unless_set(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    memory.configure_allocator.__wrapped__()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == memory.ONEDNN_CACHE_CAPACITY
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
