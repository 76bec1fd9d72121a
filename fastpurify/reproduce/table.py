"""The reproduction table: mean ± std over seeds per attack, beside the papers' values, as
``table.md``, ``table.json`` and ``table.png``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

from ..files import write_json, write_text
from .papers import METHODS, SETTINGS

Getter = Callable[[dict], float | None]


def _get(*path: str) -> Getter:
    def get(run: dict) -> float | None:
        value = run
        for key in path:
            if not isinstance(value, dict) or value.get(key) is None:
                return None
            value = value[key]
        return float(value)
    return get


# (header, getter, unit) per defense; unit "%" values are fractions shown in percent.
COLUMNS: dict[str, list[tuple[str, Getter, str]]] = {
    "anp": [
        ("before ACC", _get("before", "acc"), "%"), ("before ASR", _get("before", "asr"), "%"),
        ("threshold ACC", _get("anp", "threshold", "acc"), "%"), ("threshold ASR", _get("anp", "threshold", "asr"), "%"),
        ("threshold pruned", _get("anp", "threshold", "pruned"), "n"),
        ("clean-rule ACC", _get("anp", "clean_rule", "acc"), "%"),
        ("clean-rule ASR", _get("anp", "clean_rule", "asr"), "%"),
        ("rule pruned", _get("anp", "clean_rule", "pruned"), "n"),
        ("auto ACC", _get("anp", "auto", "acc"), "%"), ("auto ASR", _get("anp", "auto", "asr"), "%"),
        ("auto pruned", _get("anp", "auto", "pruned"), "n"),
        ("ANP s", _get("anp", "mask_seconds"), "s"),
    ],
    "pbe": [
        ("before ACC", _get("before", "acc"), "%"), ("before ASR", _get("before", "asr"), "%"),
        ("clean-set ACC", _get("pbe", "clean", "acc"), "%"), ("clean-set ASR", _get("pbe", "clean", "asr"), "%"),
        ("clean-set s", _get("pbe", "clean", "seconds"), "s"),
        ("no-clean ACC", _get("pbe", "no-clean", "acc"), "%"), ("no-clean ASR", _get("pbe", "no-clean", "asr"), "%"),
        ("no-clean s", _get("pbe", "no-clean", "seconds"), "s"),
    ],
}
PAPER_LABELS = {"before": "paper before", "anp": "paper ANP", "aft": "paper AFT (clean set)",
                "pbe": "paper PBE (no clean)"}


def summarize(values: list[float]) -> dict:
    """mean, std (sample, over seeds; 0 for one value), n, min, max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "min": min(values), "max": max(values)}


def aggregate(defense: str, runs: list[dict]) -> list[dict]:
    """One row per attack, in the order first seen: each column summarized over the seeds."""
    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    rows = []
    for attack in attacks:
        mine = [r for r in runs if r["attack"] == attack]
        cells = {}
        for header, get, unit in COLUMNS[defense]:
            values = [v for v in (get(r) for r in mine) if v is not None]
            if values:
                scale = 100.0 if unit == "%" else 1.0
                cells[header] = {**summarize([v * scale for v in values]), "unit": unit}
        rows.append({"attack": attack, "seeds": [r["seed"] for r in mine], "cells": cells})
    return rows


def _cell(cell: dict | None, unit: str) -> str:
    if cell is None:
        return "–"
    digits = 0 if unit == "n" else 1
    text = f"{cell['mean']:.{digits}f}"
    return text + (f" ± {cell['std']:.{digits}f}" if cell["n"] > 1 else "")


def _paper(published: dict, attack: str, method: str) -> str:
    pair = published.get(attack, {}).get(method)
    if not pair or all(v is None for v in pair):
        return "n/a"
    return " / ".join("?" if v is None else f"{v:g}" for v in pair)


def markdown(defense: str, rows: list[dict], header: dict, published: dict, warnings: list[str] = ()) -> str:
    """The table with a header naming the data, model, seeds, settings and devices, and below it
    ``warnings`` (subjects whose backdoor did not implant)."""
    cols = COLUMNS[defense]
    methods = METHODS[defense]
    lines = [f"# {defense.upper()} reproduction on {header['data']}", ""]
    for key, value in header["lines"]:
        lines.append(f"- **{key}**: {value}")
    lines += ["", "ACC / ASR in percent on the test images (mean ± std over seeds); times in seconds; "
              "paper columns are ACC / ASR.", ""]
    titles = ["attack", "seeds"] + [c[0] for c in cols] + [PAPER_LABELS[m] for m in methods]
    lines.append("| " + " | ".join(titles) + " |")
    lines.append("|" + "---|" * len(titles))
    for row in rows:
        cells = [row["attack"], str(len(row["seeds"]))]
        cells += [_cell(row["cells"].get(h), unit) for h, _, unit in cols]
        cells += [_paper(published, row["attack"], m) for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    if warnings:
        lines += [""] + [f"**Warning**: {w}." for w in warnings]
    lines += ["", f"Paper: {SETTINGS[defense]['paper']}."]
    if not published:
        lines.append("The papers' published values are not filled in (no readable copy of the tables where fastpurify "
                     "was written; nothing is typed from memory): give them with --paper-numbers FILE.json.")
    return "\n".join(lines) + "\n"


def write_table(out: Path, defense: str, runs: list[dict], header: dict, published: dict,
                extra: dict) -> list[Path]:
    """table.md, table.json and (with matplotlib) table.png in ``out``."""
    rows = aggregate(defense, runs)
    warnings = [f"{r['attack']} seed {r['seed']}: {r['warning']}" for r in runs if r.get("warning")]
    files = [write_text(out / "table.md", markdown(defense, rows, header, published, warnings)),
             write_json(out / "table.json", {"defense": defense, "rows": rows, "runs": runs,
                                             "paper": {"settings": SETTINGS[defense], "published": published},
                                             **extra})]
    from ..plots import matplotlib_missing, reproduction_bars

    if matplotlib_missing() is None:
        methods = [c[0][:-4] for c in COLUMNS[defense] if c[0].endswith(" ACC")]
        files.append(reproduction_bars(rows, methods, out / "table.png", title=f"{defense.upper()} on {header['data']}"))
    return files
