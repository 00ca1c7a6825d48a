import os

# Everything here must work without a model hub; make any accidental hub call fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def llava():
    """The tiny LLaVA-NeXT and a random TopK SAE at its block 2 (the engine tests' ``HOOK``)."""
    from lmm_steer.models.loader import load_model
    from sae_weights import load_sae

    return load_model("builtin:tiny-llava-next"), load_sae("builtin:random-topk:latents=256,k=8,seed=3", d_in=64,
                                                           hookpoint="model.layers.2")
