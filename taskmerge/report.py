"""Human-readable results: the console summary table and `report.md` of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.table import Table

from taskmerge.cache import atomic_write_text
from taskmerge.tasks import Task
from taskmerge.tasks.metrics import normalized


def summary_header(selection: Mapping[str, Any], with_eval_pick: bool = True) -> list[str]:
    """Columns of the final table (its title names the pick `merged` is); with selector=both and another Eval
    pick (and `with_eval_pick`), that pick's test metrics too."""
    header = ["task", "metric", "base", "fine-tuned", "merged", "base (norm.)", "merged (norm.)"]
    return header + (["Eval pick", "Eval pick (norm.)"] if with_eval_pick and "final_eval_pick" in selection else [])


def summary_rows(tasks: Sequence[Task], selection: Mapping[str, Any], refs: Mapping[str, Any],
                 with_eval_pick: bool = True) -> list[list[str]]:
    """Per task: metric, base, fine-tuned, merged (test) and normalized base/merged (and the Eval pick's); then
    the mean."""
    base, ft, final = refs["base"]["test"], refs["finetuned"]["test"], selection["final"]
    other = selection.get("final_eval_pick") if with_eval_pick else None
    rows, base_norm = [], []
    for t in tasks:
        arrow = "↑" if t.higher_is_better else "↓"
        base_norm.append(normalized(base[t.name], ft[t.name], t.higher_is_better))
        row = [t.name, f"{t.metric_name} {arrow}", f"{base[t.name]:.2f}", f"{ft[t.name]:.2f}", f"{final[t.name]:.2f}",
               f"{base_norm[-1]:.3f}", f"{selection['final_normalized_per_task'][t.name]:.3f}"]
        if other:
            row += [f"{other[t.name]:.2f}", f"{normalized(other[t.name], ft[t.name], t.higher_is_better):.3f}"]
        rows.append(row)
    metrics = {t.metric_name for t in tasks}
    if len(metrics) == 1:  # one metric for every task (CLIP: accuracy): its plain mean, as papers report it
        columns = (base, ft, final, other) if other else (base, ft, final)
        means = [f"{sum(column[t.name] for t in tasks) / len(tasks):.2f}" for column in columns]
        rows.append(["mean", f"{metrics.pop()} {'↑' if tasks[0].higher_is_better else '↓'}", *means[:3], "", "", *means[3:], *([""] if other else [])])
    rows.append(["mean", "normalized ↑", "", "", "", f"{sum(base_norm) / len(base_norm):.3f}", f"{final['normalized']:.3f}",
                 *(["", f"{other['normalized']:.3f}"] if other else [])])
    return rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def candidate_table(tasks: Sequence[Task], rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the candidates table: hyperparameters, TAP per task and mean, Eval if any."""
    with_eval = any(r.get("eval") for r in rows)
    header = ["hparams", *[f"TAP {t.name}" for t in tasks], "TAP mean"]
    if with_eval:
        header += [f"val {t.name}" for t in tasks] + ["val normalized"]
    table, several = [], len({r["method"] for r in rows}) > 1  # method=auto: name each row's method
    for r in rows:
        label = (f"{r['method']} " if several else "") + (json.dumps(r["hparams"]) if r["hparams"] else "–")
        if r.get("error"):
            table.append([label, f"failed: {r['error']}"] + [""] * (len(header) - 2))
            continue
        line = [label, *[f"{r['tap'][t.name]:.4f}" for t in tasks], f"{r['tap']['mean']:.4f}"]
        if with_eval:
            line += [f"{r['eval'][t.name]:.2f}" for t in tasks] + [f"{r['eval']['normalized']:.4f}"]
        table.append(line)
    return header, table


def aggregate_table(selection: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the agreement with Eval of every TAP aggregation (the run's own marked with *)."""
    header = ["TAP aggregation", "spearman", "kendall", "regret", "TAP pick"]
    rows = [[f"{name}{' *' if name == selection['tap_aggregate'] else ''}", f"{a['spearman']:.3f}", f"{a['kendall']:.3f}",
             f"{a['regret']:.4f}", json.dumps(a["pick"]["hparams"])] for name, a in selection["agreement_by_aggregate"].items()]
    return header, rows


def per_method_table(selection: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of each method's own TAP pick (`method=auto`), with its Eval where Eval ran."""
    header = ["method", "TAP pick", "mean TAP", "Eval of TAP pick", "Eval pick", "Eval best"]
    number = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [[method, json.dumps(p.get("tap_pick")), number(p.get("mean_tap")), number(p.get("eval_of_tap_pick")),
             json.dumps(p["eval_pick"]) if "eval_pick" in p else "", number(p.get("eval_best"))]
            for method, p in selection["per_method"].items()]
    return header, rows


def print_summary(tasks: Sequence[Task], selection: Mapping[str, Any], refs: Mapping[str, Any]) -> None:
    """Print the final table, the selected hyperparameters and the time spent per stage."""
    console = Console()
    table = Table(title=f"merged = {selection['method']}, {selection['final_by']} pick (selector={selection['selector']}): "
                        f"test metrics ({selection['evaluation']})")
    for name in summary_header(selection, with_eval_pick=False):  # the console is narrow: the Eval pick on a line below
        table.add_column(name, justify="left" if name in ("task", "metric") else "right")
    for row in summary_rows(tasks, selection, refs, with_eval_pick=False):
        table.add_row(*row)
    console.print(table)
    console.print(f"selected: {json.dumps(selection['selected'])}")
    if "per_method" in selection:
        table = Table(title=f"method=auto: each method's own TAP pick (selected: {json.dumps(selection['selected_methods'])})")
        header, rows = per_method_table(selection)
        for name in header:
            table.add_column(name, justify="left" if name in ("method", "TAP pick", "Eval pick") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if "final_eval_pick" in selection:
        console.print(f"the Eval pick {json.dumps(selection['selected']['eval'])} would give normalized "
                      f"{selection['final_eval_pick']['normalized']:.3f} on test (report.md has it per task)")
    for failure in selection["failed_candidates"]:
        console.print(f"[yellow]ignored failed candidate {json.dumps(failure['hparams'])}: {failure['error']}[/yellow]")
    if "agreement" in selection:
        console.print(f"TAP ({selection['tap_aggregate']}) vs Eval: "
                      f"{json.dumps({k: round(v, 4) for k, v in selection['agreement'].items()})}")
        table = Table(title="every TAP aggregation vs Eval (* = tap.aggregate; negative correlations = agreement)")
        header, rows = aggregate_table(selection)
        for name in header:
            table.add_column(name, justify="left" if name in ("TAP aggregation", "TAP pick") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        console.print(f"cost: {json.dumps(selection['cost'])}")
    if "frozen_agreement" in selection:
        console.print(f"frozen decoders vs Eval: {json.dumps({k: round(v, 4) for k, v in selection['frozen_agreement'].items()})}")
    console.print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in selection["seconds"].items()))


def write_report(path: Path, cfg: Mapping[str, Any], tasks: Sequence[Task], rows: Sequence[Mapping[str, Any]],
                 selection: Mapping[str, Any], refs: Mapping[str, Any], images: Mapping[str, Path]) -> Path:
    """`report.md`: selection, final table, candidates, agreement, timings and plots of a run."""
    parts = [
        f"# taskmerge report: {selection['method']} on {cfg['tasks']['name']} ({cfg['encoder']['name']})",
        f"Selector: **{selection['selector']}**. Selected: `{json.dumps(selection['selected'])}` "
        f"(method `{json.dumps(selection['selected_methods'])}`).",
        f"TAP: distance `{cfg['tap']['distance']}`, features `{cfg['tap']['features']}`, {cfg['tap']['n_samples']} unlabeled images per task, "
        f"aggregated over tasks by `{selection['tap_aggregate']}`; TAP of the base encoder θ0: "
        + ", ".join(f"{task} {value:.4f}" for task, value in selection["tap_base"].items()) + ".",
        f"## Test metrics (merged = the {selection['final_by']} pick; {selection['evaluation']})",
        _markdown_table(summary_header(selection), summary_rows(tasks, selection, refs)),
        f"Normalized performance: {selection['normalization']}.",
        "## Candidates",
        _markdown_table(*candidate_table(tasks, rows)),
    ]
    if "per_method" in selection:
        parts += ["## Each method's own TAP pick (method=auto)", _markdown_table(*per_method_table(selection))]
    if selection["failed_candidates"]:
        parts.append(f"{len(selection['failed_candidates'])} failed candidate(s) were ignored by the selection.")
    if "agreement" in selection:
        agreement = selection["agreement"]
        parts += ["## TAP vs Eval", _markdown_table(["spearman", "kendall", "regret", "candidates"],
                  [[f"{agreement['spearman']:.3f}", f"{agreement['kendall']:.3f}", f"{agreement['regret']:.4f}", agreement["n_candidates"]]]),
                  "Negative correlations mean agreement (lower TAP is better); regret = best normalized Eval − Eval of the TAP pick.",
                  "Every TAP aggregation (`tap.aggregate`) on the same candidates, the run's own marked with *:",
                  _markdown_table(*aggregate_table(selection))]
        per_task = selection["agreement_per_task"]
        parts += [_markdown_table(["task", "spearman (TAP_t, normalized Eval_t)", "kendall", "regret of the lowest TAP_t"],
                                  [[t, f"{v['spearman']:.3f}", f"{v['kendall']:.3f}", f"{v['regret']:.4f}"] for t, v in per_task.items()])]
        if "frozen_agreement" in selection:
            frozen = selection["frozen_agreement"]
            parts += [f"Frozen fine-tuned decoders as a proxy (Appendix E): Spearman {frozen['spearman']:.3f}, "
                      f"Kendall {frozen['kendall']:.3f} with Eval (negative = agreement), regret {frozen['regret']:.4f}."]
        cost = selection["cost"]
        parts += [f"Cost over the candidates: TAP {cost['tap_seconds']:.1f} s, Eval {cost['eval_seconds']:.1f} s "
                  f"(TAP is {cost['speedup']}× cheaper)."]
    parts += ["## Seconds per stage", _markdown_table(list(selection["seconds"]), [[f"{v:.1f}" for v in selection["seconds"].values()]])]
    parts += [f"![{name}](plots/{Path(p).name})" for name, p in images.items()]
    return atomic_write_text(path, "\n\n".join(parts) + "\n")
