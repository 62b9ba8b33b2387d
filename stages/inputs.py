"""What the evaluate and analyze stages read besides the store: trained SAEs and the model, both checked."""

from __future__ import annotations

from pipeline.config import Params, sae_outputs
from pipeline.errors import PipelineError
from pipeline.lm import load_model
from pipeline.sae import SparseAutoencoder, load_saelens
from pipeline.store import ActivationStore


def trained_sae(params: Params, key: str, store: ActivationStore) -> SparseAutoencoder:
    """Config `key`'s trained SAE (SAELens folder), in inference mode, checked against the store's hook and width."""
    folder = sae_outputs(params.train.out_dir, key, params.sae[key])["saelens"]
    if not (folder / "cfg.json").is_file():
        raise PipelineError(f"no trained SAE for sae.{key} at {folder}; run `pipeline train --config {key}` first")
    sae, cfg = load_saelens(folder)
    trained_hook = cfg["metadata"].get("hook_name")
    if trained_hook != params.train.hook or sae.d_in != store.d_model:
        raise PipelineError(
            f"{folder} was trained on {trained_hook} (d_in={sae.d_in}); this stage reads {params.train.hook} of "
            f"{store.path} (d_model={store.d_model}): retrain it"
        )
    return sae.eval()


def model_of_store(params: Params, store: ActivationStore):
    """The model the store was extracted from (checked by name, mode and shape): for splicing, logit effects and
    token text."""
    for key, stored in (("name", store.attrs["model"]), ("process_weights", store.attrs["process_weights"])):
        if getattr(params.model, key) != stored:
            raise PipelineError(
                f"model.{key} is {getattr(params.model, key)!r} but {store.path} was extracted with {stored!r}"
            )
    model = load_model(params.model)
    found = {"d_model": int(model.cfg.d_model), "n_ctx": int(model.cfg.n_ctx)}
    expected = {key: int(store.attrs[key]) for key in found}
    if found != expected:
        raise PipelineError(
            f"model {params.model.name!r} now has {found}, but {store.path} was extracted from a model with "
            f"{expected}: the checkpoint under that name changed; re-extract with `pipeline extract --force`"
        )
    return model
