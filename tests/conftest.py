"""Shared test set-up.

Tests never touch the network: the hub is put in offline mode before anything imports
huggingface_hub, and built models are cached under GEMTINKER_CACHE (default ~/.cache/gemtinker)
so the GGUF conversion runs once per machine.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("WANDB_MODE", "offline")
# Servers started by tests learn in fp32, so sampler and trainer logprobs agree to 1e-4; the
# bf16 learner has tests of its own.
os.environ.setdefault("GEMTINKER_TRAIN_DTYPE", "float32")


# SDK clients of finished tests keep a heartbeat thread that warns once their embedded server
# has stopped; at interpreter exit that warning hits a closed stream and prints a traceback.
import logging  # noqa: E402

logging.getLogger("tinker.lib.internal_client_holder").setLevel(logging.ERROR)

# ---------------------------------------------------------------------------------- engine
import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_adapter_ids = itertools.count()


@pytest.fixture(scope="session")
def tiny_engine():
    """One Engine over the tiny random Llama (fp32, CPU), shared by the engine tests.

    Tests create adapters with unique ids (`new_adapter`), so sharing it is safe.
    """
    from gemtinker.engine import Engine
    from gemtinker.engine.models import TINY_MODEL_NAME

    engine = Engine(TINY_MODEL_NAME, device="cpu", dtype="float32")
    yield engine
    engine.close()


@pytest.fixture
def new_adapter(tiny_engine):
    """Factory: new_adapter(rank=4, seed=0, random_b=True, **LoraSpec fields) -> adapter id.

    random_b gives B random values (LoRA init makes it zero) so the adapter changes the model:
    the tiny random model alone mostly copies its input token. Adapters are removed afterwards.
    """
    from gemtinker.engine import LoraSpec

    made: list[str] = []

    def make(rank: int = 4, seed: int = 0, random_b: bool = True, **spec_kw) -> str:
        aid = f"test-adapter-{next(_adapter_ids)}"
        tiny_engine.create_adapter(aid, LoraSpec(rank=rank, seed=seed, **spec_kw))
        if random_b:
            gen = torch.Generator().manual_seed(seed + 1000)
            with torch.no_grad():
                for _, b in tiny_engine._get(aid).weights.tensors.values():
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        made.append(aid)
        return aid

    yield make
    for aid in made:
        try:
            tiny_engine.remove_adapter(aid)
        except Exception:  # noqa: BLE001 - a test may have removed it already
            pass


# ---------------------------------------------------------------------------------- server
@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One embedded server over the tiny model for the whole run, shared by every test module that
    needs no server settings of its own (those start their own with `start_local`). Starting one per
    module cost a model load each. Sharing is safe because every test makes its own session,
    training runs and checkpoint names, and asserts on those, never on server-wide totals."""
    from gemtinker.engine.models import TINY_MODEL_NAME
    from gemtinker.server import start_local

    os.environ.setdefault("TINKER_API_KEY", "tml-local")
    with start_local(models=[TINY_MODEL_NAME], root=tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def service_client(server):
    """An SDK ServiceClient (one session) per test module, on the shared server."""
    import tinker

    sc = tinker.ServiceClient(base_url=server.base_url, api_key="tml-local")
    yield sc
    sc.close("success")


@pytest.fixture(scope="module")
def base_url(server):
    """URL of the shared server (the trainer tests pass it to the recipes)."""
    return server.base_url
