"""SAEs at several hooks in one run: one read per hook, each config as if trained alone, everything per hook."""

from __future__ import annotations

import json

import torch
import yaml
from conftest import invoke, saebench_accepted, write_params

import stages.train
from pipeline.artifacts import sae_outputs
from pipeline.params import load_params

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
CONFIGS = {  # two configs share the last hook
    "h0": {"hook": HOOKS[0], "expansion": 2, "batch_size": 16, "lr": 1e-3, "epochs": 1, "architecture": "matryoshka"},
    "h1": {"hook": HOOKS[1], "expansion": 2, "batch_size": 16, "lr": 1e-3, "epochs": 1, "architecture": "batchtopk"},
    "h2": {"hook": HOOKS[2], "expansion": 2, "batch_size": 16, "lr": 1e-3, "epochs": 1},
    "h2b": {"hook": HOOKS[2], "expansion": 4, "batch_size": 8, "lr": 1e-3, "epochs": 1, "architecture": "topk"},
}


def test_one_run_trains_evaluates_and_reports_saes_at_three_hooks(tmp_path, tiny_params, monkeypatch):
    assert invoke("extract", "--params", str(tiny_params), "-S", f"extract.hooks=[{', '.join(HOOKS)}]").exit_code == 0
    store = load_params(tiny_params).extract.store
    train = {"hook": HOOKS[1], "seq_len": 8, "device": "cpu", "k": 4}

    def params_for(out: str, configs: dict):
        path = write_params(tmp_path / f"{out}.yaml", extract={"store": store, "hooks": HOOKS},
                            train=train | {"out_dir": str(tmp_path / out)},
                            model={"name": load_params(tiny_params).model.name, "device": "cpu"})  # fmt: skip
        path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"sae": configs}))  # these configs only
        return path

    together = params_for("together", CONFIGS)
    loaders = []
    original = stages.train.ActivationLoader

    def recorded(store, split, hook, *args, **kwargs):
        loaders.append(hook)
        return original(store, split, hook, *args, **kwargs)

    monkeypatch.setattr(stages.train, "ActivationLoader", recorded)
    result = invoke("train", "--params", str(together), "--config", "all")
    assert result.exit_code == 0, result.output
    assert sorted(loaders) == HOOKS  # one read of each hook, shared by the configs at it
    monkeypatch.undo()

    alone = params_for("alone", {"h2b": CONFIGS["h2b"]})
    assert invoke("train", "--params", str(alone)).exit_code == 0
    params = load_params(together)
    weights = {
        out: torch.load(sae_outputs(tmp_path / out, "h2b", params.sae["h2b"])["checkpoint"], weights_only=True)["sae"]
        for out in ("together", "alone")
    }
    assert all(torch.equal(value, weights["alone"][name]) for name, value in weights["together"].items())

    for command in ("evaluate", "analyze", "stability", "report"):
        result = invoke(command, "--params", str(together))
        assert result.exit_code == 0, (command, result.output)
    for key, cfg in CONFIGS.items():
        paths = sae_outputs(tmp_path / "together", key, params.sae[key])
        assert json.loads((paths["saelens"] / "cfg.json").read_text())["hook_name"] == cfg["hook"]
        assert json.loads(paths["eval_details"].read_text())["hook"] == cfg["hook"]
        assert saebench_accepted(paths["saebench_core"])["eval_result_unstructured"]["hook"] == cfg["hook"]
    shares = json.loads((tmp_path / "together/details/stability.json").read_text())["shares"]
    assert shares["h0"] == {} and set(shares["h2"]) == {"h2b"}  # latents compared only within a hook
    report = (tmp_path / "together/report.md").read_text()
    for hook in HOOKS:
        assert f"## Comparative analysis at `{hook}`" in report and f"## Recommendation at `{hook}`" in report
    assert f"hooks `{HOOKS[0]}`, `{HOOKS[1]}`, `{HOOKS[2]}`" in report
