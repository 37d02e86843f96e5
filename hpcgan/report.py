"""Results rows -> the paper's tables (CSV and Markdown) and figures.

    python tools/report.py studies/paper            # or any folder holding runs with results.jsonl files

Reads every `results.jsonl` below the folder (the rows hpcgan.evaluate and the classifier stage append;
hpcgan/results.py) and nothing else. A row appended again by a re-run replaces the earlier one with the same
key (run, stage, metric, class, extractor, weights, steps, tag, split): the last one counts. Writes to
`<folder>/report/` (or `out=`):

  results.csv           the tidy table: one row per run x metric (x class), with the config columns
  table3_<ext>_<px>.csv/.md   per GAN model: IS, FID, LPIPS, P, R, F1 (+ KID, intra-FID, density, coverage,
                        class accuracy, memorisation) - the paper's Table 3
  table4_<ext>_<px>.csv/.md   per GAN model: l1, l2, PSNR, SSIM (nearest same-class real image) - Table 4
  table5_<px>.csv/.md   per classifier architecture x data regime: accuracy, macro P/R/F1 - Table 5
  table6_<px>.csv/.md   per class (for each architecture x regime): accuracy, specificity, sensitivity - Table 6
  scarcity_<px>_<cut>.csv/.md  per scarce cut: every regime's balanced accuracy, macro-F1, accuracy, steps and
                        the recall of each cut class on real test cells, with the study's `full` (the rival's
                        recipe on the uncut split) and `rival` rows and, under the table, which recipe won the
                        rival search and by how much on val; rows with a GAN's cells also carry that GAN's
                        fidelity on each cut class (class accuracy of its cells by the `cell` classifier and
                        intra-FID in `cell` features, from the evaluations of the trained generator on the same
                        cut and size: per GAN run its newest step, EMA weights when evaluated; mean over seeds)
  verdict_<px>_<cut>_<arch>[_tta].csv/.md  issue 20's test on that cut, per classifier architecture with `rival`
                        and `full` rows (hpcgan.verdict): the target (the rival's mean cut recall plus half its
                        gap to `full`'s) and, for every row with a GAN's cells and every `realN` row, its mean
                        cut recall, balanced accuracy, gain over the rival (per seed too), whether it meets the
                        target at no less balanced accuracy than the rival's, and its runs (run_dirs)
  fig_verdict_<px>_<cut>_<arch>.png  the same as a picture: a dot per seed, the rival's mean and the target as lines
  rival_search_<px>_<cut>.csv/.md  the rival search: every cheap recipe's val scores (never test), best first
  sources.csv           for every table cell, the run directories its number comes from
  fig_ac_accuracy.png   the auxiliary classifier's accuracy on real and generated images against the step, a
                        line per GAN run (the paper's Figs. 7-8), from the runs' log.csv
  fig_samples.png       the newest sample grid of every GAN run, side by side
  fig_per_class_<px>.png  per-class sensitivity of every architecture x regime (bars)
Each number is "mean ± std (n)" over seeds in Markdown and three columns (mean, std, n) in CSV. Numbers from
different feature extractors or image sizes are never averaged together (a table per extractor and size);
a run that is missing shows as missing ("–" / empty), never as zero.
"""
from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hpcgan.fsutil import atomic_write_bytes
from hpcgan.jsonfile import write_json
from hpcgan.results import read_rows
from hpcgan.rundir import EXIT_BAD_INPUT, EXIT_FAILED
from hpcgan.settings import MISSING
from hpcgan.verdict import markdown as verdict_markdown
from hpcgan.verdict import VerdictError, real_n, row_name, seeds_of, tta_of, verdicts

logger = logging.getLogger("hpcgan.report")


class NoRowsError(ValueError):
    """The folder holds no results rows: the user's input, not a bug."""

# the paper's columns first, then what a GAN researcher now also expects
TABLE3 = ("is", "fid", "lpips", "precision", "recall", "f1", "kid", "intra_fid", "density", "coverage",
          "class_accuracy", "memorisation")
TABLE4 = ("l1", "l2", "psnr", "ssim")
# the quality study (issue 9): the numbers its targets are about, one table
QUALITY = ("intra_fid", "fid", "precision", "recall", "class_accuracy", "diversity_ratio", "memorisation")
TABLE5 = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "balanced_accuracy", "steps_run")
# the scarcity study: the whole test set, then each scarce class's recall (sensitivity) on real test cells, and
# the steps each classifier trained (early stopping: the step it stopped at)
SCARCITY = ("balanced_accuracy", "macro_f1", "accuracy", "steps_run")
TABLE6 = ("accuracy", "specificity", "sensitivity")
# beside the scarcity table: the per-class fidelity of the GAN whose cells a row used, for each cut class
FIDELITY = ("class_accuracy", "intra_fid")
KEY = ("run_dir", "stage", "metric", "class", "extractor", "weights", "steps", "tag", "real_split")
CONFIG = ("stage", "model", "arch", "regime", "synthetic_from", "scarce", "tta", "seed", "steps", "image_size",
          "extractor", "extractor_sha256", "weights", "tag", "manifest_sha256", "real_split", "run_dir")


@dataclass
class ReportSettings:
    study: str = MISSING        # a folder: every results.jsonl below it is read
    out: str | None = None      # default <study>/report
    figures: bool = True


# ---- reading ----------------------------------------------------------------------------------------

def load_rows(folder: str | Path) -> pd.DataFrame:
    """Every row of every results.jsonl below `folder`, de-duplicated (the last appended row of a key wins)."""
    files = sorted(Path(folder).rglob("results.jsonl"))
    rows = [dict(r, _file=str(f), _order=i) for f in files for i, r in enumerate(read_rows(f))]
    if not rows:
        return pd.DataFrame(columns=[*KEY, "value"])
    df = pd.DataFrame(rows)
    for col in (*KEY, *CONFIG, "value", "skipped", "source"):
        if col not in df:
            df[col] = None
    # a GAN's evaluation carries its cut inside its training regime: the scarcity table matches on it
    gan_cut = df["regime"].map(lambda r: r.get("scarce") if isinstance(r, dict) else None)
    df["scarce"] = df["scarce"].where(df["scarce"].notna(), gan_cut).map(_scarce_name)
    df["regime"] = df["regime"].map(_regime_name)
    key = df[list(KEY)].astype(object).map(str).agg("|".join, axis=1)
    df = df.assign(_key=key).drop_duplicates("_key", keep="last").drop(columns=["_key", "_order"])
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    for col in ("seed", "steps", "image_size"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df.reset_index(drop=True)


def _regime_name(regime) -> str | None:
    """A classifier's regime is a name; a GAN's training regime a dict (balance, diffaug, split): one string."""
    if regime is None or isinstance(regime, str):
        return regime
    if isinstance(regime, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(regime.items()) if v not in (None, False, [], "")) or "default"
    return str(regime)


def _scarce_name(scarce) -> str | None:
    """A scarce cut {monocyte: 20, eosinophil: 20} as one string, "eosinophil=20,monocyte=20" (None: no cut)."""
    if scarce is None or isinstance(scarce, float) or not scarce:   # None, NaN (pandas' missing), {}
        return None
    if isinstance(scarce, dict):
        return ",".join(f"{k}={int(v)}" for k, v in sorted(scarce.items()))
    return str(scarce)


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in (*CONFIG, "metric", "class", "value", "skipped", "n_real", "n_fake", "n_train", "n_test")
            if c in df]
    return df[cols].sort_values([c for c in ("stage", "model", "arch", "regime", "seed", "metric", "class")
                                 if c in df], na_position="first", kind="stable")


# ---- aggregating ------------------------------------------------------------------------------------

def summarise(df: pd.DataFrame, by: list[str], metrics: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean/std/n per `by` group and metric, wide; the run directories behind each cell, long).
    std is over seeds (ddof 1; empty for a single seed); n counts the finite values."""
    df = df[df["metric"].isin(metrics)].copy()
    if df.empty:
        return pd.DataFrame(), pd.DataFrame()
    df[by] = df[by].astype(object).where(df[by].notna(), "–")  # a missing grouping value is a group of its own
    g = df.groupby([*by, "metric"])
    stats = g["value"].agg(mean="mean", std="std", n="count").unstack("metric")
    cols = [(stat, m) for m in metrics if m in set(df["metric"]) for stat in ("mean", "std", "n")]
    wide = stats.reindex(columns=pd.MultiIndex.from_tuples(cols))
    wide.columns = [f"{m}_{stat}" for stat, m in cols]
    sources = g["run_dir"].agg(lambda s: ";".join(sorted({str(x) for x in s}))).reset_index(name="run_dirs")
    return wide.reset_index(), sources


def markdown(wide: pd.DataFrame, by: list[str], metrics: tuple[str, ...]) -> str:
    """'mean ± std (n)' cells; '–' where a number is missing."""
    shown = pd.DataFrame({c: wide[c] for c in by})
    for m in metrics:
        if f"{m}_mean" in wide:
            shown[m] = [_cell(a, b, n) for a, b, n in zip(wide[f"{m}_mean"], wide[f"{m}_std"], wide[f"{m}_n"])]
    note = wide.attrs.get("note")   # a line said under the table (the rival's choice)
    return shown.to_markdown(index=False) + (f"\n\n{note}" if note else "")


def _cell(mean, std, n) -> str:
    if n is None or not np.isfinite(n) or n == 0 or not np.isfinite(mean):
        return "–"
    if n > 1 and np.isfinite(std):
        return f"{mean:.4g} ± {std:.2g} ({int(n)})"
    return f"{mean:.4g} ({int(n)})"


# ---- the tables -------------------------------------------------------------------------------------

def gan_tables(df: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, list[str], tuple]]:
    """Tables 3 and 4, one per (extractor, image size): name -> (wide, sources, by, metrics)."""
    ev = df[(df["stage"] == "evaluate") & df["class"].isna()]
    out = {}
    for (ext, size), part in ev.groupby(["extractor", "image_size"], dropna=False):
        by = ["model", "weights", "tag"] + (["steps"] if part["steps"].nunique() > 1 else [])
        for name, metrics in (("table3", TABLE3), ("table4", TABLE4), ("quality", QUALITY)):
            # pixel metrics (Table 4) do not depend on the extractor: they carry the evaluation's anyway
            wide, sources = summarise(part, by, metrics)
            if not wide.empty:
                out[f"{name}_{ext}_{_px(size)}"] = (wide, sources, by, metrics)
    return out


def classifier_tables(df: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, list[str], tuple]]:
    """Tables 5 (whole test set) and 6 (per class), one per image size."""
    cl = df[df["stage"] == "classify"]
    search = cl[cl["real_split"] == "val"]          # a rival search's runs: scored on val, kept out of the tables
    cl = cl[cl["real_split"] != "val"]
    out, gens = {}, _generator_evaluations(df[df["stage"] == "evaluate"])
    for size, part in search.groupby("image_size", dropna=False):
        out.update(search_tables(part, size))
    for size, part in cl.groupby("image_size", dropna=False):
        # which GAN's synthetic set, and which scarce cut, make a regime's row: never averaged together
        by = ["arch", "regime"] + [c for c in ("synthetic_from", "scarce", "tag") if part[c].notna().any()]
        tta = part["tta"].map(tta_of)
        part = part.assign(tta=tta)
        by += ["tta"] if tta.nunique() > 1 else []   # test-time augmentation: rows of their own
        wide, sources = summarise(part[part["class"].isna()], by, TABLE5)
        if not wide.empty:
            out[f"table5_{_px(size)}"] = (wide, sources, by, TABLE5)
        per = part[part["class"].notna()]
        wide, sources = summarise(per, [*by, "class"], TABLE6)
        if not wide.empty:
            out[f"table6_{_px(size)}"] = (wide, sources, [*by, "class"], TABLE6)
        out.update(scarcity_tables(part, size, gens))
    return out


def scarcity_tables(cl: pd.DataFrame, size, ev: pd.DataFrame | None = None
                    ) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, list[str], tuple]]:
    """Per scarce cut: every regime's balanced accuracy, macro-F1, accuracy and the recall (sensitivity) of
    each scarce class on the real test split, mean ± std over seeds; the study's `full` rows (uncut, the rival's
    recipe) join every cut's table as its reference, and so do its `realN` rows (the rival's recipe with the cut
    classes at N real cells: classify.more_real) to each cut of the same classes (a table of their own while no
    such cut has rows); the rival's choice is said under it. Rows with a GAN's cells carry its per-class fidelity
    on the cut classes (`ev`: _generator_evaluations' rows; _fidelity)."""
    out = {}
    for cut, part in _cut_parts(cl):
        fidelity, extra = _fidelity(part, ev, str(cut), size)
        wide, sources, by, metrics = _with_recalls(pd.concat([part, fidelity], ignore_index=True), str(cut),
                                                   SCARCITY, ["arch", "regime", "synthetic_from"], extra)
        if not wide.empty:
            wide.attrs["note"] = rival_note(part)
            out[_unique(out, f"scarcity_{_px(size)}_{_cut_slug(cut)}", cut)] = (wide, sources, by, metrics)
    return out


def _cut_parts(cl: pd.DataFrame):
    """(cut, rows) per scarce cut: its runs, with the study's `full` rows and the `realN` rows of the same
    classes (classify.more_real) of the same architectures. A `realN` cut with no cut of its classes is a cut
    of its own."""
    full = cl[(cl["tag"] == "full") & cl["scarce"].isna()]
    classes = cl["scarce"].map(lambda c: frozenset(_cut_classes(str(c))))
    more = cl["tag"].map(real_n).notna() & cl["scarce"].notna()
    more &= classes.isin(set(classes[cl["scarce"].notna() & ~more]))
    for cut, part in cl[cl["scarce"].notna() & ~more].groupby("scarce"):
        same = more & (classes == frozenset(_cut_classes(str(cut))))
        yield cut, pd.concat([full[full["arch"].isin(part["arch"])], cl[same & cl["arch"].isin(part["arch"])], part],
                             ignore_index=True)


def verdict_tables(df: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, str]]:
    """Issue 20's test (hpcgan.verdict) per image size, scarce cut and classifier architecture (with 8-view
    test-time averaging or without) that has `rival` and `full` rows and a row to judge: name -> (table,
    markdown). Rows that cannot be judged (VerdictError) are a warning: the other tables are still written."""
    cl = df[(df["stage"] == "classify") & (df["real_split"] != "val")]
    out = {}
    for size, sized in cl.groupby("image_size", dropna=False):
        for cut, part in _cut_parts(sized):
            try:
                found = verdicts(part, _cut_classes(str(cut)))
            except VerdictError as e:
                logger.warning("report: no verdict for the cut %s at %s: %s", cut, _px(size), e)
                continue
            for (arch, tta), table in found.items():
                name = f"verdict_{_px(size)}_{_cut_slug(cut)}_{_cut_slug(arch)}" + ("_tta" if tta else "")
                label = f"{arch}, 8-view test-time averaging" if tta else arch
                out[_unique(out, name, cut)] = (table, verdict_markdown(table, label, str(cut)))
    return out


def search_tables(search: pd.DataFrame, size) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, list[str], tuple]]:
    """Per scarce cut, the rival search's recipes with their val scores, best val macro-F1 first."""
    out = {}
    for cut, part in search.groupby(search["scarce"].fillna("uncut")):
        wide, sources, by, metrics = _with_recalls(part, str(cut), ("macro_f1", "balanced_accuracy", "steps_run"),
                                                   ["arch", "regime"])
        if not wide.empty:
            if "macro_f1_mean" in wide:
                wide = wide.sort_values("macro_f1_mean", ascending=False, kind="stable").reset_index(drop=True)
            out[_unique(out, f"rival_search_{_px(size)}_{_cut_slug(cut)}", cut)] = (wide, sources, by, metrics)
    return out


def _cut_classes(cut: str) -> list[str]:
    return [kv.split("=")[0] for kv in cut.split(",") if "=" in kv]


def _fidelity(part: pd.DataFrame, ev: pd.DataFrame | None, cut: str, size) -> tuple[pd.DataFrame, tuple]:
    """(rows, metric names): the per-class fidelity (FIDELITY) on each cut class of the GAN model that made a
    classifier row's synthetic cells, from that model's evaluations on the same cut and image size, as rows
    `<metric>_<class>` of every (arch, tag, regime) group it fed; averaged over the GAN's seeds by summarise.
    A set of another name than its GAN's (a study's generate.variants, e.g. curated) has none.
    intra-FID only in `cell` features (never averaged with another extractor's)."""
    classes = _cut_classes(cut)
    names = tuple(f"{m}_{c}" for c in classes for m in FIDELITY)
    fed = part[part["synthetic_from"].notna()]
    if ev is None or ev.empty or fed.empty:
        return part.iloc[:0], names
    mine = ev[(ev["scarce"] == cut) & ev["class"].isin(classes) & ev["metric"].isin(FIDELITY)
              & (ev["image_size"] == size) & ((ev["metric"] == "class_accuracy") | (ev["extractor"] == "cell"))]
    # an evaluation names its GAN by its tag when it has one (a study's variant of a model), else by its model
    mine = mine.assign(metric=mine["metric"] + "_" + mine["class"].astype(str), **{"class": None},
                       _gan=mine["tag"].where(mine["tag"].notna(), mine["model"]))
    groups = fed[["arch", "tag", "regime", "synthetic_from"]].astype(object).drop_duplicates()
    rows = groups.merge(mine.drop(columns=["arch", "tag", "regime", "synthetic_from"], errors="ignore"),
                        left_on="synthetic_from", right_on="_gan").drop(columns="_gan")
    return rows, names


def _generator_evaluations(ev: pd.DataFrame) -> pd.DataFrame:
    """Per GAN run, the evaluation of what its sets are drawn from: the trained generator (never `init`), at
    its newest evaluated step, with EMA weights when it was evaluated with them (tools/generate.py's default)."""
    ev = ev[(ev["source"] == "generator") & (ev["weights"] != "init")]
    if ev.empty:
        return ev
    newest = ev.groupby("run_dir")["steps"].transform("max")
    ev = ev[ev["steps"] == newest]
    has_ema = ev.groupby("run_dir")["weights"].transform(lambda w: (w == "ema").any())
    return ev[~has_ema | (ev["weights"] == "ema")]


def _with_recalls(part: pd.DataFrame, cut: str, metrics: tuple, by: list[str], extra: tuple = ()):
    """summarise() of the whole-set metrics, the recall (sensitivity) of each class of the cut, and `extra`
    metrics the rows already carry by name."""
    scarce = _cut_classes(cut)
    recall = part[part["class"].isin(scarce) & (part["metric"] == "sensitivity")]
    recall = recall.assign(metric="recall_" + recall["class"].astype(str))
    both = pd.concat([part[part["class"].isna()], recall], ignore_index=True)
    metrics = (*metrics, *(f"recall_{c}" for c in scarce), *extra)
    by = by[:1] + (["tag"] if both["tag"].notna().any() else []) + by[1:]
    wide, sources = summarise(both, by, metrics)
    return wide, sources, by, metrics


def rival_note(part: pd.DataFrame) -> str:
    """Which recipe the rival search chose for these rows and its val margin over the runner-up."""
    if "recipe_from" not in part:
        return ""
    chosen, lines = part[part["recipe_from"].notna()], []
    for (arch, won), rows in chosen.groupby(["arch", "recipe_from"]):
        margin = pd.to_numeric(rows.get("recipe_margin"), errors="coerce").dropna()
        runner = rows["recipe_runner_up"].dropna() if "recipe_runner_up" in rows else pd.Series(dtype=object)
        said = f"{margin.iloc[0]:+.4f} val macro-F1 over {runner.iloc[0]}" if len(margin) and len(runner) else "no runner-up"
        lines.append(f"Rival search ({arch}): `{won}` won on val ({said}).")
    return "\n".join(lines)


def _cut_slug(cut) -> str:
    """"immature granulocyte=20,monocyte=20" -> "immature_granulocyte20_monocyte20": a file name without spaces."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(cut).replace(",", "_").replace("=", ""))


def _unique(tables: dict, name: str, cut) -> str:
    """A table's file name, refused when another cut already took it (their slugs collide)."""
    if name in tables:
        raise ValueError(f"two scarce cuts give the report file name {name!r} (one of them {cut!r}): rename a class")
    return name


def _px(size) -> str:
    return f"{int(size)}px" if size is not None and np.isfinite(float(size)) else "unknown"


# ---- figures ----------------------------------------------------------------------------------------

def gan_runs(df: pd.DataFrame) -> list[Path]:
    """GAN run directories the rows name (evaluations of a generator)."""
    ev = df[(df["stage"] == "evaluate") & (df["source"] == "generator") & (df["weights"] != "init")]
    return sorted({Path(r) for r in ev["run_dir"].dropna()})


def fig_ac_accuracy(runs: list[Path], path: Path) -> Path | None:
    """The auxiliary classifier's accuracy on real and generated images against the step (Figs. 7-8)."""
    from matplotlib.figure import Figure

    from hpcgan.viz import read_columns
    curves = [(r, read_columns(r / "log.csv")) for r in runs]
    curves = [(r, c) for r, c in curves if c.get("ac_acc_real")]
    if not curves:
        return None
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, col, title in zip(axes, ("ac_acc_real", "ac_acc_fake"), ("real images", "generated images")):
        for run, c in curves:
            if c.get(col):
                xs, ys = zip(*c[col])
                ax.plot(xs, ys, lw=1.2, label=run.name)
        ax.set_title(f"auxiliary classifier accuracy: {title}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def fig_samples(runs: list[Path], path: Path) -> Path | None:
    """The newest sample grid of every GAN run, side by side, each titled with its run name."""
    from PIL import Image

    from hpcgan.viz import save_png
    grids = [(r, sorted((r / "samples").glob("step-*.png"))) for r in runs]
    grids = [(r, g[-1]) for r, g in grids if g]
    if not grids:
        return None
    from PIL import ImageDraw
    ims = [Image.open(p).convert("RGB") for _, p in grids]
    labels = [f"{run.name} ({grid.stem})" for run, grid in grids]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(im.width, int(measure.textlength(t)) + 4) for im, t in zip(ims, labels)]
    canvas = Image.new("RGB", (sum(widths) + 8 * len(ims), max(i.height for i in ims) + 16), (255, 255, 255))
    draw, x = ImageDraw.Draw(canvas), 0
    for im, label, w in zip(ims, labels, widths):
        canvas.paste(im, (x, 16))
        draw.text((x + 2, 2), label, fill=(20, 20, 20))
        x += w + 8
    return save_png(canvas, path)


def fig_per_class(wide: pd.DataFrame, by: list[str], path: Path, metric: str = "sensitivity") -> Path | None:
    """Bars of a per-class metric (Table 6), one bar per row of the table's grouping (`by` less the class:
    architecture x regime x synthetic source x cut) and class."""
    from matplotlib.figure import Figure
    col = f"{metric}_mean"
    if wide.empty or col not in wide:
        return None
    keys = [c for c in by if c != "class"]
    # classes without a number (not in the test split) take no room
    classes = list(dict.fromkeys(wide.loc[wide[col].notna(), "class"]))
    groups = list(dict.fromkeys(wide[keys].itertuples(index=False, name=None)))
    fig = Figure(figsize=(max(6, 0.6 * len(classes) * max(1, len(groups)) ** 0.5), 3.5 + 0.15 * len(groups)))
    ax = fig.subplots()
    width = 0.8 / len(groups)
    for k, group in enumerate(groups):
        part = wide[(wide[keys] == pd.Series(group, index=keys)).all(axis=1)].set_index("class")
        ys = [part[col].get(c, np.nan) for c in classes]
        ax.bar(np.arange(len(classes)) + k * width, ys, width, label=" / ".join(str(g) for g in group))
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(metric, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.42), ncol=2, frameon=False)  # below the bars
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def fig_verdict(table: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Issue 20's test as a picture: per row (the rival, each candidate, `full`) its cut classes' mean recall,
    a dot per seed and a bar at the mean; the rival's mean and the target as vertical lines; a candidate that
    meets the target (at no less balanced accuracy) in green, one that does not in red, `realN` rows in blue."""
    from matplotlib.figure import Figure
    if table.empty:
        return None
    ref = table.iloc[0]
    rows = [(f"rival (bal. acc. {ref['rival_balanced_accuracy']:.3f})", seeds_of(ref["rival_per_seed"]), "0.4"),
            *((_verdict_label(r), seeds_of(r["per_seed"]), _verdict_colour(r)) for _, r in table.iterrows()),
            ("full (uncut)", seeds_of(ref["full_per_seed"]), "0.4")]
    fig = Figure(figsize=(9, 1.4 + 0.45 * len(rows)))
    ax = fig.subplots()
    for y, (_label, values, color) in enumerate(rows):
        ax.scatter(values, [y] * len(values), color=color, s=18, zorder=3)
        if values:
            ax.plot([np.mean(values)] * 2, [y - 0.3, y + 0.3], color=color, lw=2.5)
    ax.axvline(ref["rival_cut_recall"], color="0.4", ls=":", lw=1, label="the rival's mean")
    ax.axvline(ref["target"], color="black", ls="--", lw=1, label="target")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("the cut classes' mean recall on real test cells (dot: a seed, bar: the mean)", fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="lower left", frameon=False)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _verdict_colour(r: pd.Series) -> str:
    """Green: synthetic cells that meet the target; red: that do not; blue: real cells (a `realN` row, the bar)."""
    if not isinstance(r["synthetic_from"], str):
        return "tab:blue"
    return "tab:green" if r["met"] else "tab:red"


def _verdict_label(r: pd.Series) -> str:
    return f"{row_name(r)} ({r['cells']}; bal. acc. {r['balanced_accuracy']:.3f})"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---- the report -------------------------------------------------------------------------------------

def report(study: str | Path, out: str | Path | None = None, figures: bool = True) -> dict[str, Path]:
    """Write the tables and figures of every results row below `study`; returns name -> path."""
    study = Path(study)
    if not study.is_dir():
        raise FileNotFoundError(f"{study} is not a folder")
    out = Path(out) if out else study / "report"
    df = load_rows(study)
    if df.empty:
        raise NoRowsError(f"no results rows below {study} (results.jsonl files, written by tools/evaluate.py "
                         "and tools/classify.py)")
    written = {"results": _csv(tidy(df), out / "results.csv")}
    sources = []
    tables = {**gan_tables(df), **classifier_tables(df)}
    for name, (wide, src, by, metrics) in tables.items():
        written[name] = _csv(wide, out / f"{name}.csv")
        atomic_write_bytes(out / f"{name}.md", (markdown(wide, by, metrics) + "\n").encode())
        sources.append(src.assign(table=name))
    verdicts_ = verdict_tables(df)
    for name, (table, text) in verdicts_.items():
        written[name] = _csv(table, out / f"{name}.csv")
        atomic_write_bytes(out / f"{name}.md", text.encode())
    if sources:
        written["sources"] = _csv(pd.concat(sources, ignore_index=True), out / "sources.csv")
    if figures:
        written.update(draw_figures(df, tables, out, verdicts_))
    write_json(out / "index.json", {k: str(v) for k, v in written.items()}, indent=1)
    return written


def draw_figures(df: pd.DataFrame, tables: dict, out: Path, verdicts_: dict | None = None) -> dict[str, Path]:
    """Every figure the rows allow; one that fails is a warning naming it (the tables are written already)."""
    runs = gan_runs(df)
    todo = {"fig_ac_accuracy": lambda: fig_ac_accuracy(runs, out / "fig_ac_accuracy.png"),
            "fig_samples": lambda: fig_samples(runs, out / "fig_samples.png")}
    for name, (wide, _src, by, _metrics) in tables.items():
        if name.startswith("table6_"):
            fig = f"fig_per_class_{name.split('_', 1)[1]}"
            todo[fig] = lambda wide=wide, by=by, fig=fig: fig_per_class(wide, by, out / f"{fig}.png")
    for name, (table, _text) in (verdicts_ or {}).items():
        title = f"Issue 20's test: {name.removeprefix('verdict_')}"
        todo[f"fig_{name}"] = lambda table=table, title=title, name=name: fig_verdict(table, title,
                                                                                    out / f"fig_{name}.png")
    written = {}
    for name, draw in todo.items():
        try:
            path = draw()
        except Exception as e:  # noqa: BLE001 - a figure is never worth the tables
            logger.warning("report: figure %s not drawn: %s: %s", name, type(e).__name__, e, exc_info=True)
            continue
        if path is not None:
            written[name] = path
    return written


def _csv(df: pd.DataFrame, path: Path) -> Path:
    atomic_write_bytes(path, df.to_csv(index=False).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    import sys

    from hydra import compose, initialize_config_dir

    from hpcgan import CONFIG_DIR
    from hpcgan.settings import SettingsError, parse
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    # `report.py DIR` or study=DIR: taken out before Hydra, whose `study` is the sweep's config group
    study = [a.split("=", 1)[1] if "=" in a else a for a in args if "=" not in a or a.startswith("study=")]
    args = [a for a in args if "=" in a and not a.startswith("study=")]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("report", overrides=args)
    if study:
        cfg.study = study[-1]
    try:
        s = parse(ReportSettings, cfg)
        written = report(s.study, s.out, s.figures)
    except (SettingsError, FileNotFoundError, NoRowsError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - a bug, not the user's input: its traceback, and the failure code
        logger.exception("report: internal error (please report it with this traceback)")
        return EXIT_FAILED
    for name, path in written.items():
        print(f"{name:<24}{path}")
    for name in sorted(written):
        if name.startswith("table") and (Path(written[name]).with_suffix(".md")).is_file():
            print(f"\n{name}\n" + Path(written[name]).with_suffix(".md").read_text())
    return 0
