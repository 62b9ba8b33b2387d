"""SAEBench's sparse-probing output (`eval_type_id: "sparse_probing"`, SAEBench 0.6.0's
`SparseProbingEvalOutput`), from this project's probes of one config.

The fields are SAEBench's; the datasets are ours: each label task is a "dataset" named `<corpus>/<task>` (such
as `gsm8k/operation`), its probed classes its one-vs-all problems, and a dataset's accuracy is the mean over
them, as SAEBench averages its classes. `llm_test_accuracy` is our dense probe on the activations (SAEBench trains
that probe with its own torch loop; ours is scikit-learn's on standardized features), `llm_top_k` and `sae_top_k`
SAEBench's k-sparse probes on the model's dimensions and on the latents. `sae_test_accuracy` (a probe on all
latents) is not computed: null, as SAEBench allows. Samples are tokens, not SAEBench's mean-pooled sequences, and
`probe_train_set_size`/`probe_test_set_size` the largest balanced sample of any problem. The accuracy of the dense
probe on the reconstructions, which SAEBench does not have, is in `eval_result_unstructured`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.evaluate.saebench import saebench_output

SAEBENCH_K = (1, 2, 5, 10, 20, 50, 100)  # the k SAEBench's output has fields for


def sparse_probing_output(details: dict[str, Any], eval_config: dict[str, Any], sae_cfg: dict[str, Any]) -> dict:
    """The SAEBench sparse-probing JSON of one config from its probe details (stages/probe.py)."""
    ks = [k for k in details["k"] if k in SAEBENCH_K]
    by_task: dict[str, list[dict]] = {}
    for problem in details["problems"]:
        by_task.setdefault(problem["task"], []).append(problem)
    rows = [_dataset_row(f"{details['corpus']}/{task}", problems, ks) for task, problems in by_task.items()]
    reconstruction = {row["dataset_name"]: row.pop("reconstruction_test_accuracy") for row in rows}  # ours only

    def mean(field: str) -> float | None:
        values = [row[field] for row in rows if row.get(field) is not None]
        return float(np.mean(values)) if values else None

    llm = {"llm_test_accuracy": mean("llm_test_accuracy"), **{f"llm_top_{k}_test_accuracy": mean(
        f"llm_top_{k}_test_accuracy") for k in ks}}  # fmt: skip
    sae = {"sae_test_accuracy": None, **{f"sae_top_{k}_test_accuracy": mean(f"sae_top_{k}_test_accuracy") for k in ks}}
    config = eval_config | {"dataset_names": [row["dataset_name"] for row in rows], "k_values": ks}
    return saebench_output("sparse_probing", config, {"llm": llm, "sae": sae}, rows, sae_cfg, {
        "written_by": "gsm8k-sae-pipeline (pipeline probe)",
        "hook": details["hook"],
        "split": details["split"],
        "datasets": "a label task of the corpus's token labels (docs/probing.md); samples are tokens",
        "reconstruction_test_accuracy": reconstruction,
    })  # fmt: skip


def _dataset_row(name: str, problems: list[dict], ks: list[int]) -> dict[str, Any]:
    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    return {
        "dataset_name": name,
        "llm_test_accuracy": mean([p["dense"]["x"] for p in problems]),
        **{f"llm_top_{k}_test_accuracy": mean([p["llm_sparse"][str(k)]["accuracy"] for p in problems]) for k in ks},
        "sae_test_accuracy": None,
        **{f"sae_top_{k}_test_accuracy": mean([p["sparse"][str(k)]["accuracy"] for p in problems]) for k in ks},
        "reconstruction_test_accuracy": mean([p["dense"]["x_hat"] for p in problems]),
    }
