"""The method's report: one table (overall mAP, critical mAP per supercategory, train/val
critical gap) and PNG plots (per-layer Fisher traces with the chosen bits; per-group mAP
of each method)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fqdetr.evaluation.report import format_ap  # noqa: E402
from fqdetr.io import atomic_savefig, atomic_write_text, write_json  # noqa: E402

# The demo's picture of float vs 4-bit detections (fqdetr.experiments.demo.draw_comparison),
# described by results["detections_picture"] {"file", "methods", "score_threshold", "images"}.
DETECTIONS_PICTURE = "detections.png"


def method_table(results):
    """Markdown table of every method in ``results["methods"]``."""
    critical = results["config"]["critical"]
    groups = sorted(next(iter(results["methods"].values()))["val"]["critical"])
    header = ["method", "val mAP", "train mAP"] + [f"val AP {g}" for g in groups] + \
        [f"{critical} gap (train-val)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results["methods"].items():
        gap = None
        tr, va = r["train"]["critical"].get(critical), r["val"]["critical"].get(critical)
        if tr is not None and va is not None:
            gap = tr - va
        cells = [name, format_ap(r["val"]["mAP"]), format_ap(r["train"]["mAP"])] + \
            [format_ap(r["val"]["critical"].get(g)) for g in groups] + [format_ap(gap)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_layers(results, path):
    """Per-layer Fisher traces (overall, critical; log scale) and the bits each allocation chose."""
    names = list(results["sizes"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(names) * 0.25), 7), sharex=True)
    for key, trace in results["traces"].items():
        ax1.semilogy(range(len(names)), [max(trace[n], 1e-12) for n in names], marker="o", ms=3, label=key)
    ax1.set_ylabel("tr(F_l)")
    ax1.legend()
    for i, (key, alloc) in enumerate(results["allocations"].items()):
        ax2.bar([x + (i - 1) * 0.27 for x in range(len(names))], [alloc[n] for n in names], 0.27, label=key)
    ax2.set_ylabel("weight bits")
    ax2.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def plot_groups(results, path):
    """Val critical AP per supercategory for each method (grouped bars)."""
    methods = list(results["methods"])
    groups = sorted(results["methods"][methods[0]]["val"]["critical"])
    fig, ax = plt.subplots(figsize=(max(7, len(groups) * 1.6), 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [results["methods"][m]["val"]["critical"].get(g) or 0.0 for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], vals, width, label=m)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups)
    ax.set_ylabel("val AP@[.5:.95]")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def write_method_report(results, out_dir):
    """Writes results.json, report.md, layers.png and groups.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, out_dir / "results.json")
    plot_layers(results, out_dir / "layers.png")
    plot_groups(results, out_dir / "groups.png")
    cfg = results["config"]
    text = (f"# Fisher-aware quantization: demo report\n\ncritical set: **{cfg['critical']}**; weight budget: the size of "
            f"uniform {cfg['budget_avg_bits']}-bit weights with the first conv and heads at 8 bit "
            f"({results.get('budget_avg_bits_all_layers', float('nan')):.2f} bits per weight overall), activations "
            f"8 bit; QAT "
            f"{cfg['qat_steps']} steps from the Fisher-critical allocation; Fisher over {cfg['fisher_images']} "
            f"training images; seed {cfg['seed']}; {results.get('seconds', 0):.0f} s.\n\n"
            f"{method_table(results)}\n\nAP in percent. ![layers](layers.png) ![groups](groups.png)\n")
    picture = results.get("detections_picture")
    if picture:
        text += (f"\nDetections scoring >= {picture['score_threshold']} (critical classes in red) of "
                 f"{', '.join(picture['methods'])} on the first {picture['images']} val images: "
                 f"![detections]({picture['file']})\n")
    atomic_write_text(out_dir / "report.md", text)
    return out_dir / "report.md"
