"""Evaluation reports: report.json, report.md and per-category AP bar charts."""
import logging
import os
import re

from fqdetr.io import atomic_savefig, atomic_write_text, write_json

log = logging.getLogger(__name__)


def format_ap(x, scale=100.0):
    """An AP-like value for people: ``scale * x`` with one decimal (percent by default), "n/a"
    for None (what COCO leaves undefined). The one number format of fqdetr's reports."""
    return "n/a" if x is None else f"{scale * x:.1f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(result, title="Detection evaluation"):
    """Markdown text of an ``evaluate_detections`` result (AP values in %)."""
    o = result["overall"]
    parts = [f"# {title}", "",
             f"{result.get('num_images', '?')} images, {result.get('num_detections', '?')} detections. "
             "AP = COCO AP@[.5:.95] (pycocotools), in %.", "", "## Overall", "",
             _table(["AP", "AP50", "AP75", "APs", "APm", "APl"],
                    [[format_ap(o.get(k)) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]])]
    transformed = result.get("critical_transformed", {})
    header = ["critical set", "categories", "AP", "AP50"]
    if transformed:
        header += ["AP (T_S)", "AP50 (T_S)"]
    rows = []
    for name, r in result.get("critical", {}).items():
        row = [name, ", ".join(r.get("categories", [])), format_ap(r["AP"]), format_ap(r["AP50"])]
        if transformed:
            t = transformed.get(name, {})
            row += [format_ap(t.get("AP")), format_ap(t.get("AP50"))]
        rows.append(row)
    if rows:
        parts += ["", "## Critical sets", "",
                  "COCOeval with params.catIds restricted to the set"
                  + ("; T_S: on transformed predictions (a query whose argmax is \"other\" "
                     "is not a detection of the set)." if transformed else "."), "",
                  _table(header, rows)]
    cats = [(n, c) for group in _groups(result).values() for n, c in group]
    parts += ["", "## Per category", "",
              _table(["supercategory", "category", "id", "#gt", "AP", "AP50"],
                     [[c["supercategory"], n, c["id"], c.get("num_gt", ""), format_ap(c["AP"]), format_ap(c["AP50"])]
                      for n, c in cats])]
    return "\n".join(parts) + "\n"


def _groups(result):
    """{supercategory: [(category name, per-category entry)]}, groups in order of
    their first category id, categories in id order."""
    groups = {}
    for name, c in sorted(result.get("per_category", {}).items(), key=lambda kv: kv[1]["id"]):
        groups.setdefault(c["supercategory"], []).append((name, c))
    return groups


def plot_per_category(result, out_dir):
    """Bar charts of per-category AP: one overview with bars grouped (and coloured)
    by supercategory, and one chart per supercategory. Returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    groups = _groups(result)
    paths = []
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(result.get("per_category", {})) + 2), 4))
    x, ticks, labels = 0, [], []
    for g, (sup, cats) in enumerate(groups.items()):
        xs = list(range(x, x + len(cats)))
        ax.bar(xs, [100 * (c["AP"] or 0) for _, c in cats], color=colours(g % 10), label=sup)
        ticks += xs
        labels += [n for n, _ in cats]
        x += len(cats) + 1  # gap between groups
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("AP@[.5:.95] (%)")
    ax.set_title("Per-category AP by supercategory")
    if groups:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ap_per_category.png"))
    atomic_savefig(fig, paths[-1])
    plt.close(fig)
    for sup, cats in groups.items():
        fig, ax = plt.subplots(figsize=(max(3, 0.6 * len(cats) + 1.5), 3))
        ax.bar([n for n, _ in cats], [100 * (c["AP"] or 0) for _, c in cats])
        ax.set_ylim(0, 100)
        ax.set_ylabel("AP (%)")
        ax.set_title(f"{sup}")
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"ap_{re.sub(r'[^A-Za-z0-9_.-]+', '_', sup)}.png"))
        atomic_savefig(fig, paths[-1])
        plt.close(fig)
    return paths


def write_report(result, out_dir, title="Detection evaluation", plots=True):
    """Write report.json, report.md and the AP bar charts into ``out_dir``, each atomically.

    Returns {"json": path, "markdown": path, "plots": [paths]}.
    """
    os.makedirs(out_dir, exist_ok=True)
    json_path = write_json(result, os.path.join(out_dir, "report.json"))
    md_path = atomic_write_text(os.path.join(out_dir, "report.md"), render_markdown(result, title))
    pngs = plot_per_category(result, out_dir) if plots else []
    log.info("report written to %s", out_dir)
    return {"json": json_path, "markdown": md_path, "plots": pngs}
