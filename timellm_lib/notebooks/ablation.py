"""The ablation study of notebook 05: plan the runs, train them, and read back what they show.

A study has three parts, each a set of training runs repeated over seeds:

- ``variants``: the module ablation (baseline, +TAPR, +GRA-M, full, from
  ``configs/ablation/*.yaml``), the LLM ablations (``model.llm_ablation`` no_llm, llm2attn,
  llm2trsf) and DLinear;
- ``sensitivity``: one variant with one setting changed per run (``n_scales``, ``top_k``,
  ``lambda_trend``, ``lambda_retrieval``, or any dotted config key);
- ``fusion``: one TAPR variant trained with each ``model.fusion`` mode, written ``mode`` or
  ``mode+form`` to choose ``model.fusion_form`` too (``always+multiplicative``).

:func:`build_plan` resolves and validates every run's config before anything trains, and
runs whose resolved configs are identical are trained once (the full variant at the default
``top_k`` is also a point of the ``top_k`` curve). A run's directory name ends in a hash of
its resolved config, so re-running a study resumes or reuses finished runs (``--resume
auto``) and a changed setting never resumes a run of another config.

:func:`execute` trains the runs either through the batch driver, each run an execution of
``notebooks/01_train.ipynb`` with papermill (the study's default: every run leaves an executed
notebook beside its run directory), or directly with :func:`timellm_lib.training.train` in
this process (faster for short runs). Either way the results are read back from the run
directories only (``eval_test.json``, ``metrics.jsonl``, ``config.yaml``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from timellm_lib.config import Config, load_config
from timellm_lib.errors import WorkbenchError
from timellm_lib.notebooks.plots import PALETTE
from timellm_lib.notebooks.runs import load_metrics, read_config, read_evals

ENTRY_COLUMNS = ["study", "variant", "label", "seed", "param", "param_value", "run"]
RUN_COLUMNS = ["run", "status", "seconds", "error"]
TRAIN_NOTEBOOK = "notebooks/01_train.ipynb"
RUNNERS = ("batch", "direct")
DIRECTION_CHANCE = 1 / 3  # up, down, flat: the accuracy of a uniform guess


@dataclass(frozen=True)
class Variant:
    """A named model of the study: a config file of ``config_dir`` plus overrides."""

    name: str
    label: str  # how tables and figures call it
    config: str
    overrides: tuple[str, ...] = ()


VARIANTS = {
    v.name: v
    for v in [
        Variant("baseline", "baseline", "baseline.yaml"),
        Variant("tapr", "+TAPR", "tapr.yaml"),
        Variant("gram", "+GRA-M", "gram.yaml"),
        Variant("full", "full", "full.yaml"),  # TAPR and GRA-M
        Variant("no_llm", "no LLM", "baseline.yaml", ("model.llm_ablation=no_llm",)),
        Variant("llm2attn", "LLM→attn", "baseline.yaml", ("model.llm_ablation=llm2attn",)),
        Variant("llm2trsf", "LLM→trsf", "baseline.yaml", ("model.llm_ablation=llm2trsf",)),
        Variant("dlinear", "DLinear", "baseline.yaml", ("model.name=dlinear",)),
    ]
}


@dataclass(frozen=True)
class PlannedRun:
    """One training run: ``config`` with ``overrides``, then ``train.seed = seed`` (the order
    notebooks/01_train.ipynb applies them in)."""

    name: str
    config: str
    overrides: tuple[str, ...]
    seed: int
    run_dir: Path

    def resolve(self) -> Config:
        return load_config(self.config, [*self.overrides, f"train.seed={self.seed}"])


@dataclass
class Plan:
    """The runs to train (unique) and the study entries that use them (a run can serve
    several entries)."""

    root: Path
    runs: dict[str, PlannedRun]
    entries: pd.DataFrame  # ENTRY_COLUMNS

    def table(self) -> pd.DataFrame:
        """One row per run: its entries, overrides, and whether it already has results."""
        rows = []
        for name, run in self.runs.items():
            used = self.entries[self.entries["run"] == name]
            roles = [_role(e) for e in used.itertuples()]
            rows.append(
                {
                    "run": name,
                    "used as": "; ".join(roles),
                    "config": run.config,
                    "overrides": " ".join(run.overrides),
                    "seed": run.seed,
                    "has results": (run.run_dir / "eval_test.json").is_file(),
                }
            )
        return pd.DataFrame(rows)


def _role(entry: Any) -> str:
    if entry.study == "variants":
        return f"variant {entry.variant}"
    return f"{entry.study} {entry.param}={entry.param_value}"


def build_plan(
    variants: Sequence[str],
    seeds: Sequence[int],
    output_root: str | Path,
    config_dir: str | Path = "configs/ablation",
    overrides: Sequence[str] = (),
    sensitivity: dict[str, Sequence[Any]] | None = None,
    sensitivity_variant: str = "full",
    fusion_modes: Sequence[str] = (),
    fusion_variant: str = "full",
) -> Plan:
    """Every run of the study, validated (see the module docstring).

    ``overrides`` apply to every run, before the variant's own (so a variant stays what its
    name says). ``sensitivity`` maps a setting (``top_k`` means ``model.top_k``; dotted keys
    are taken as they are) to its values, each a run of ``sensitivity_variant`` per seed.
    ``fusion_modes`` are ``model.fusion`` values, optionally ``+`` a ``model.fusion_form``
    (``always+multiplicative``), each a run of ``fusion_variant`` per seed.
    """
    if not seeds:
        raise WorkbenchError("seeds is empty; give at least one seed, e.g. [2021]")
    chosen = [_variant(name) for name in variants]
    root = Path(output_root)
    planned: dict[str, PlannedRun] = {}
    by_config: dict[str, str] = {}  # resolved-config hash -> run name
    entries = []

    def add(
        study: str, variant: Variant, seed: int, param: str | None, value: Any, extra: list[str]
    ) -> None:
        run_overrides = (*overrides, *variant.overrides, *extra)
        config = str(Path(config_dir) / variant.config)
        probe = PlannedRun("", config, run_overrides, seed, root)
        try:
            resolved = probe.resolve().to_dict()
        except WorkbenchError as err:
            raise WorkbenchError(
                f"the {study} run of variant {variant.name} (seed {seed}"
                f"{f', {param}={value}' if param else ''}) has an invalid config: {err}"
            ) from None
        resolved.pop("run")
        digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]
        if digest not in by_config:
            setting = (
                "_" + re.sub(r"[^\w.=+-]+", "_", f"{param}={value}").strip("_") if param else ""
            )
            name = f"{variant.name}{setting}_seed{seed}-{digest}"
            by_config[digest] = name
            planned[name] = PlannedRun(name, config, run_overrides, seed, root / name)
        entries.append([study, variant.name, variant.label, seed, param, value, by_config[digest]])

    for seed in seeds:
        sweep = (chosen, sensitivity, sensitivity_variant, fusion_modes, fusion_variant)
        for study, variant, param, value, extra in _seed_settings(*sweep):
            add(study, variant, seed, param, value, extra)
    plan = Plan(root, planned, pd.DataFrame(entries, columns=ENTRY_COLUMNS))
    if fusion_modes:
        _check_fusion_variant(plan, fusion_variant)
    return plan


def _seed_settings(
    chosen: list[Variant],
    sensitivity: dict[str, Sequence[Any]] | None,
    sensitivity_variant: str,
    fusion_modes: Sequence[str],
    fusion_variant: str,
) -> Iterator[tuple[str, Variant, str | None, Any, list[str]]]:
    """(study, variant, setting, value, overrides) of every run one seed gets."""
    for variant in chosen:
        yield "variants", variant, None, None, []
    for param, values in (sensitivity or {}).items():
        if not isinstance(values, list | tuple) or not values:
            raise WorkbenchError(
                f"sensitivity[{param!r}] must be a non-empty list of values, got {values!r}"
            )
        key = param if "." in param else f"model.{param}"
        for value in values:
            yield (
                "sensitivity",
                _variant(sensitivity_variant),
                param,
                value,
                [f"{key}={_yaml(value)}"],
            )
    for value in fusion_modes:
        mode, _, form = str(value).partition("+")
        extra = [f"model.fusion={_yaml(mode)}", *([f"model.fusion_form={form}"] * bool(form))]
        yield "fusion", _variant(fusion_variant), "fusion", value, extra


def _check_fusion_variant(plan: Plan, fusion_variant: str) -> None:
    first = plan.runs[plan.entries[plan.entries["study"] == "fusion"]["run"].iloc[0]]
    if not first.resolve().model.use_tapr:
        raise WorkbenchError(
            f"fusion_variant {fusion_variant!r} has no TAPR (model.use_tapr is false), so "
            "model.fusion changes nothing; choose tapr or full"
        )


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise WorkbenchError(f"unknown ablation variant {name!r}; choose from {list(VARIANTS)}")
    return VARIANTS[name]


def _yaml(value: Any) -> str:
    """A value as the right-hand side of a ``--set`` override. JSON is YAML, and quoting
    strings keeps YAML 1.1 from reading words such as ``off`` as booleans."""
    return json.dumps(value)


# ------------------------------------------------------------------------------ running


def execute(
    plan: Plan,
    runner: str = "batch",
    notebook: str | Path = TRAIN_NOTEBOOK,
    progress: bool = True,
) -> pd.DataFrame:
    """Train every run of the plan (finished ones are only confirmed, interrupted ones
    resumed); returns one row per run: ``run, status, seconds, error``.

    ``runner``: ``batch`` executes ``notebook`` (parameters config, overrides, run_dir,
    resume, seed) for each run through :func:`timellm_lib.notebooks.batch.run_plan`, writing the
    executed notebooks to ``<root>/notebooks``; ``direct`` calls ``train`` in this process.
    A failing run is reported in its row and the others still run.
    """
    check_runner(runner)
    if runner == "batch":
        return _execute_batch(plan, Path(notebook), progress)
    return _execute_direct(plan, progress)


def check_runner(runner: str) -> None:
    if runner not in RUNNERS:
        raise WorkbenchError(f"runner {runner!r} is unknown; choose one of {list(RUNNERS)}")


def _execute_direct(plan: Plan, progress: bool) -> pd.DataFrame:
    from tqdm.auto import tqdm

    from timellm_lib.training import train

    rows = []
    for run in tqdm(list(plan.runs.values()), desc="runs", disable=not progress):
        started = time.perf_counter()
        try:
            result = train(run.resolve(), run_dir=run.run_dir, resume="auto", progress=False)
            status, error = result.status, ""
        except Exception as err:  # one failing run must not stop the study
            status, error = "failed", f"{type(err).__name__}: {err}"
        rows.append([run.name, status, round(time.perf_counter() - started, 1), error])
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def _execute_batch(plan: Plan, notebook: Path, progress: bool) -> pd.DataFrame:
    from timellm_lib.notebooks.batch import run_plan

    runs = list(plan.runs.values())
    batch_plan = {
        "output_dir": str(plan.root / "notebooks"),
        "runs": [
            {
                "notebook": str(notebook),
                "parameters": {
                    "config": run.config,
                    "overrides": list(run.overrides),
                    "run_dir": str(run.run_dir),
                    "resume": "auto",
                    "seed": run.seed,
                },
            }
            for run in runs
        ],
    }
    summary = run_plan(batch_plan, cwd=".", progress=progress)
    return pd.DataFrame(
        {
            "run": [run.name for run in runs],
            "status": summary["status"].to_numpy(),
            "seconds": summary["seconds"].to_numpy(),
            "error": summary["error"].to_numpy(),
        }
    )


# ------------------------------------------------------------------------------ results


def collect(plan: Plan) -> pd.DataFrame:
    """The study entries with their test scores (``mse``, ``mae``: scaled space, as the
    protocol reports) and ``finished``; entries whose run has no ``eval_test.json`` (failed
    or unfinished) get NaN scores."""
    scores = {}
    for name, run in plan.runs.items():
        test = read_evals(run.run_dir).get("test", {}) if run.run_dir.is_dir() else {}
        scores[name] = {"mse": test.get("mse", np.nan), "mae": test.get("mae", np.nan)}
    table = plan.entries.copy()
    table["mse"] = [scores[r]["mse"] for r in table["run"]]
    table["mae"] = [scores[r]["mae"] for r in table["run"]]
    table["finished"] = table["mse"].notna()
    return table


def summary_table(results: pd.DataFrame, study: str = "variants") -> pd.DataFrame:
    """Mean ± std over seeds of MSE and MAE per variant (sensitivity: per setting value),
    from the finished runs, in plan order; std is 0 for a single seed."""
    rows = results[(results["study"] == study) & results["finished"]]
    by = ["label"] if study == "variants" else ["label", "param", "param_value"]
    stats = rows.groupby(by, sort=False).agg(
        n=("mse", "size"),
        mse_mean=("mse", "mean"),
        mse_std=("mse", "std"),
        mae_mean=("mae", "mean"),
        mae_std=("mae", "std"),
    )
    table = stats.fillna({"mse_std": 0.0, "mae_std": 0.0}).reset_index()
    for metric in ("mse", "mae"):
        table[metric] = [
            f"{m:.4f} ± {s:.4f}"
            for m, s in zip(table[f"{metric}_mean"], table[f"{metric}_std"], strict=True)
        ]
    return table[[*by, "n", "mse", "mae", "mse_mean", "mse_std", "mae_mean", "mae_std"]]


def sensitivity_frames(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per sensitivity setting, its finished runs with the setting as a numeric column of
    that name (what :func:`timellm_lib.notebooks.plots.sensitivity_mpl` draws)."""
    rows = results[(results["study"] == "sensitivity") & results["finished"]]
    frames = {}
    for param, group in rows.groupby("param", sort=False):
        frame = group.copy()
        frame[param] = pd.to_numeric(frame["param_value"])
        frames[param] = frame
    return frames


# ------------------------------------------------------------------------------ diagnostics


def train_events(run_dir: str | Path) -> pd.DataFrame:
    """The run's ``train`` events in step order (empty when it logged none)."""
    metrics = load_metrics(run_dir)
    return metrics[metrics["event"] == "train"].sort_values("global_step")


def aux_terms(events: pd.DataFrame) -> list[str]:
    """The auxiliary-loss fields of train events (``aux_tapr``, ``aux_gram``; not the
    ``aux_warmup`` factor)."""
    return [c for c in events.columns if c.startswith("aux_") and c != "aux_warmup"]


# the two parts of GRA-M's aux loss as train events log them (GRAM.loss, unweighted)
GRAM_LOSS_PARTS = ("gram_gate_entropy", "gram_gate_consistency")
AUX_COLUMNS = ["variant", "seed", "term", "steps", "aux", "mse", "aux / mse", "ok", "note"]


def aux_loss_check(
    plan: Plan, results: pd.DataFrame, early_events: int = 3, min_ratio: float = 0.01
) -> pd.DataFrame:
    """Is each auxiliary loss clearly above zero early in training, and does each part of
    GRA-M's gate loss ever matter?

    For every TAPR or GRA-M run of the variants study: the mean of each logged aux term
    (lambda-weighted, before the warm-up factor) and of the MSE over the first
    ``early_events`` train events, their ratio, and ``ok`` when the ratio is at least
    ``min_ratio``. An aux loss that is ~0 from the start would train nothing. GRA-M's total
    can pass while one of its two parts (entropy and consistency of the item weights, about
    0.01 at initialisation) stays ~0: each part (times ``lambda_retrieval``) gets a row over
    the whole run, ``ok`` when it reaches ``min_ratio`` x the MSE in some train event, and
    the note ``near zero throughout`` when it never does.
    """
    rows = []
    for entry in _enhanced_entries(plan, results):
        every = train_events(plan.runs[entry.run].run_dir)
        events = every.head(early_events)
        row = {"variant": entry.label, "seed": entry.seed}
        for term in aux_terms(events):
            aux, mse = float(events[term].mean()), float(events["mse"].mean())
            ok = aux / mse >= min_ratio
            rows.append(
                row
                | {
                    "term": term,
                    "steps": _step_span(events),
                    "aux": aux,
                    "mse": mse,
                    "aux / mse": aux / mse,
                    "ok": ok,
                    "note": "" if ok else "near zero early in training",
                }
            )
        weight = plan.runs[entry.run].resolve().model.lambda_retrieval
        for part in [c for c in GRAM_LOSS_PARTS if c in every.columns]:
            ratio = weight * every[part] / every["mse"]
            ok = bool(ratio.max() >= min_ratio)
            rows.append(
                row
                | {
                    "term": f"{part} x lambda_retrieval",
                    "steps": _step_span(every),
                    "aux": weight * float(every[part].mean()),
                    "mse": float(every["mse"].mean()),
                    "aux / mse": float(ratio.mean()),
                    "ok": ok,
                    "note": "" if ok else "near zero throughout the run",
                }
            )
    return pd.DataFrame(rows, columns=AUX_COLUMNS)


def aux_check_summary(aux: pd.DataFrame, min_ratio: float) -> str:
    """What :func:`aux_loss_check` found, in sentences: the count, then every term that
    fails, named, so a near-zero loss is said rather than lost in the table."""
    lines = [f"{int(aux['ok'].sum())} of {len(aux)} auxiliary terms reach {min_ratio} x the MSE"]
    for row in aux[~aux["ok"]].itertuples():
        lines.append(
            f"{row.variant} (seed {row.seed}): {row.term} is {row.note} (steps {row.steps}, "
            f"mean {row.aux:.2g} against an MSE of {row.mse:.2g}): it gives its module almost "
            "no gradient"
        )
    return "\n".join(lines)


def trend_accuracy(plan: Plan, results: pd.DataFrame, events_per_end: int = 3) -> pd.DataFrame:
    """TAPR's trend classification on the training batches, early versus late in training:
    the mean direction and magnitude accuracy of the first and last ``events_per_end``
    train events, the share of flat labels, and the accuracy of a uniform guess (1/3)."""
    rows = []
    for entry in _enhanced_entries(plan, results, flag="use_tapr"):
        events = train_events(plan.runs[entry.run].run_dir)
        if "tapr_direction_accuracy" not in events:
            continue
        early, late = events.head(events_per_end), events.tail(events_per_end)
        rows.append(
            {
                "variant": entry.label,
                "seed": entry.seed,
                "early steps": _step_span(early),
                "direction acc. early": early["tapr_direction_accuracy"].mean(),
                "late steps": _step_span(late),
                "direction acc. late": late["tapr_direction_accuracy"].mean(),
                "magnitude acc. late": late["tapr_magnitude_accuracy"].mean(),
                "flat share": late["tapr_flat_fraction"].mean(),
                "chance": DIRECTION_CHANCE,
            }
        )
    return pd.DataFrame(rows)


def _enhanced_entries(plan: Plan, results: pd.DataFrame, flag: str | None = None) -> list[Any]:
    """Variants-study entries (one per run) whose run uses TAPR or GRA-M (or ``flag``)."""
    rows = results[results["study"] == "variants"].drop_duplicates("run")
    chosen = []
    for entry in rows.itertuples():
        run_dir = plan.runs[entry.run].run_dir
        if not (run_dir / "metrics.jsonl").is_file():
            continue
        model = read_config(run_dir).get("model", {})
        flags = [flag] if flag else ["use_tapr", "use_gram"]
        if model.get("name") == "timellm" and any(model.get(f) for f in flags):
            chosen.append(entry)
    return chosen


def _step_span(events: pd.DataFrame) -> str:
    if events.empty:
        return ""
    return f"{int(events['global_step'].min())}-{int(events['global_step'].max())}"


def diagnostics_mpl(plan: Plan, results: pd.DataFrame) -> Figure:
    """Left: each aux loss relative to the MSE along training (log scale); right: TAPR's
    trend-direction accuracy on training batches, with the uniform-guess level."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    plt.close(fig)  # returned, not shown twice (see timellm_lib.notebooks.plots)
    colors = iter(PALETTE * 4)
    for entry in _enhanced_entries(plan, results):
        events = train_events(plan.runs[entry.run].run_dir)
        name = f"{entry.label} s{entry.seed}"
        for term in aux_terms(events):
            ratio = events[term] / events["mse"]
            left.plot(events["global_step"], ratio, color=next(colors), label=f"{name} {term}")
        if "tapr_direction_accuracy" in events:
            right.plot(events["global_step"], events["tapr_direction_accuracy"], label=name)
    left.set_yscale("log")
    left.set_title("aux loss / mse (train events)")
    right.axhline(DIRECTION_CHANCE, color="0.5", ls=":", label="uniform guess")
    right.set_title("TAPR trend-direction accuracy (train batches)")
    right.set_ylim(0, 1)
    for ax in (left, right):
        ax.set_xlabel("global_step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    return fig


def fusion_comparison(plan: Plan, results: pd.DataFrame, device: str = "cpu") -> pd.DataFrame:
    """Test scores of each fusion run's ``best.pt`` with trend fusion applied and not applied.

    Training applies fusion in both ``always`` and ``train_only`` (the published design),
    so the two train alike; at validation and test ``train_only`` switches it off, so its
    test forecasts come from a different function than the one training optimised. The
    ``as configured`` row of a run is the score its mode reports (``eval_test.json``); the
    other row is a re-evaluation of the same weights with fusion switched. ``form`` is the
    run's ``model.fusion_form`` (reference or the design's multiplicative form).
    """
    from timellm_lib.evaluation.inference import evaluate_loaded, load_for_inference

    rows = []
    fusion = results[(results["study"] == "fusion") & results["finished"]]
    for entry in fusion.itertuples():
        best = plan.runs[entry.run].run_dir / "checkpoints" / "best.pt"
        trained_with = str(entry.param_value).partition("+")[0]
        form = plan.runs[entry.run].resolve().model.fusion_form
        configured = "on" if trained_with == "always" else "off"
        switched = "off" if configured == "on" else "on"
        mode = "always" if switched == "on" else "off"
        loaded = load_for_inference(best, device, overrides=[f"model.fusion={_yaml(mode)}"])
        other = evaluate_loaded(loaded, "test", write=False)
        own = {"mse": entry.mse, "mae": entry.mae}
        for applied, scores in ((configured, own), (switched, other)):
            rows.append(
                {
                    "trained with": trained_with,
                    "form": form,
                    "seed": entry.seed,
                    "fusion at test": applied,
                    "as configured": applied == configured,
                    "mse": scores["mse"],
                    "mae": scores["mae"],
                }
            )
    return pd.DataFrame(
        rows,
        columns=["trained with", "form", "seed", "fusion at test", "as configured", "mse", "mae"],
    )
