"""Model resolution: built-in models offline, local folders, clear errors."""

import pytest
from transformers import AutoTokenizer

from gemtinker import DEFAULT_MODEL
from gemtinker.engine import models
from gemtinker.engine.types import UnknownModelError


def test_tiny_model_resolves_and_registers_tokenizer_by_name():
    resolved = models.resolve_model(models.TINY_MODEL_NAME)
    assert (resolved.path / "config.json").is_file()
    models.resolve_model(DEFAULT_MODEL)  # registers it by name (a fresh HF cache has neither)
    # What the tinker SDK / cookbook do: load the tokenizer by model name, here with no network.
    tok = AutoTokenizer.from_pretrained(models.TINY_MODEL_NAME)
    assert tok.eos_token == "<|im_end|>"
    tok_default = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    assert tok_default.encode("hello world") == tok.encode("hello world")


def test_local_folder_resolves_to_itself():
    folder = models.resolve_model(models.TINY_MODEL_NAME).path
    assert models.resolve_model(str(folder)).path == folder


def test_unknown_model_error_names_what_was_tried(tmp_path):
    with pytest.raises(UnknownModelError) as err:
        models.resolve_model("no-such-org/no-such-model")
    text = str(err.value)
    assert "no-such-org/no-such-model" in text and "local folder" in text and "hub id" in text
    assert DEFAULT_MODEL in text  # tells the user what does exist
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownModelError, match="no config.json"):
        models.resolve_model(str(tmp_path / "empty"))
