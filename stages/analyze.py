"""Stage `analyze`: what each latent learned, over the held-out split, as a feature browser per config (with each
latent's best token label from `pipeline probe`, where it ran first)."""

from __future__ import annotations

import logging

from pipeline.analyze.browser import is_browser_folder, with_labels, write_browser
from pipeline.analyze.features import analyze
from pipeline.analyze.logits import vocabulary_of
from pipeline.artifacts import sae_name, sae_outputs, trained_sae
from pipeline.core.atomic import check_replaceable
from pipeline.core.device import resolve_device
from pipeline.core.progress import progress_bars
from pipeline.model import model_of_store
from pipeline.params import Params
from pipeline.probe.outputs import read_latent_labels
from pipeline.store import ActivationStore
from pipeline.train.loader import ActivationLoader

log = logging.getLogger(__name__)


def run(params: Params, which: str = "all") -> dict[str, str]:
    """Analyse the configs named by `which` ("all" or a key of `sae`); returns each browser page's path."""
    settings, train = params.analyze, params.train
    for key, cfg in params.sae_configs(which).items():  # before any work: never replace a folder that is not ours
        check_replaceable(sae_outputs(train.out_dir, key, cfg)["browser"], is_browser_folder)
    store = ActivationStore(params.extract.store)
    device = resolve_device(train.device)
    saes = {key: trained_sae(params, key, store).to(device) for key in params.sae_configs(which)}
    tokens, offsets = store.tokens(settings.split), store.doc_offsets(settings.split)
    vocabulary = None if store.is_synthetic else vocabulary_of(model_of_store(params.model, store), device)
    pages = {}
    for hook, keys in params.by_hook(saes).items():  # the configs at one hook read one loader of it
        loader = ActivationLoader(store, settings.split, hook, device, train.seed, train.exclude_bos,
                                  train.memory_budget_gb)  # fmt: skip
        if not loader.resident_on_device:
            log.info("%s/%s is larger than train.memory_budget_gb: %s", settings.split, hook, loader.order_kind)
        with progress_bars({key: 2 * loader.n_tokens for key in keys}) as bars:  # passes 1 and 2; 3 is short
            for key in keys:
                payload = analyze(saes[key], loader, tokens, offsets, settings, train.seed, vocabulary,
                                  on_block=bars[key].advance)  # fmt: skip
                cfg = params.sae[key]
                payload |= {"config": key, "name": sae_name(key, cfg), "architecture": cfg.architecture,
                            "hook": hook, "split": settings.split}  # fmt: skip
                if cfg.target_hook:  # a transcoder: contexts of its input, decoder directions in its target's space
                    payload["target_hook"] = cfg.target_hook
                paths = sae_outputs(train.out_dir, key, cfg)
                payload = with_labels(payload, read_latent_labels(paths["probe"], saes[key].d_sae))
                pages[key] = str(write_browser(paths["browser"], payload))
                log.info("sae.%s: feature browser written to %s", key, pages[key])
    return pages
