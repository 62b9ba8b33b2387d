"""Stage `stability`: how many latents of each config have a counterpart in each other config (decoder cosines),
written to artifacts/details/stability.json for the report."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.artifacts import stability_path, trained_folder
from pipeline.core.atomic import write_json
from pipeline.params import Params
from pipeline.report.stability import THRESHOLDS, feature_stability
from pipeline.saes.saelens import load_saelens

log = logging.getLogger(__name__)


def run(params: Params) -> Path:
    """Compare the saved decoders of every pair of configs at one hook; returns the file written."""
    shares = {}
    for keys in params.by_reads(params.sae).values():  # latents at different hooks live in different spaces
        decoders = {key: load_saelens(trained_folder(params, key))[0].W_dec.detach() for key in keys}
        shares |= feature_stability(decoders)
    path = stability_path(params.train.out_dir)
    write_json(path, {"thresholds": list(THRESHOLDS), "shares": shares})
    log.info("feature stability written to %s", path)
    return path
