"""One seed of the findings study (docs/METHOD.md section 6): every arm at the same size budget,
evaluated on the same val images with the paired bootstrap's per-resample APs.

The seed draws the Fisher / calibration images (a random subset of the training split), the
random allocations, the Hutchinson probes and QAT's data order; the val images are the same
for every seed. Every trace is taken on the model being allocated, the uniform PTQ model
(fake-quantized, calibrated on the seed's images); ``traces_from`` in the output says so.

Arms: float; PTQ uniform; PTQ random (``random_draws`` draws of fqdetr.allocate.random_sensitivity);
PTQ hessian (Hutchinson trace of the overall objective); PTQ fisher-overall; PTQ fisher-critical-<mode>
for each critical-objective mode; QAT plain / + Fisher-trace regulariser / + critical classes
up-weighted, all three from the first mode's Fisher-critical allocation.
"""
import copy
import logging
import time
from dataclasses import asdict, dataclass

import torch

from fqdetr.allocate import allocate_bits, random_sensitivity, sensitivities
from fqdetr.critical import MODES
from fqdetr.data import class_names_of
from fqdetr.engine.checkpoint import seed_everything
from fqdetr.engine.family import family_of
from fqdetr.engine.loader import make_loader
from fqdetr.engine.qat import qat, upweighted_criterion
from fqdetr.engine.quantize import fixed_bounds, layer_weights, quantize_detr
from fqdetr.engine.setup import checkpoint_geometry, critical_setup, load_datasets
from fqdetr.experiments.evaluator import SplitEvaluator
from fqdetr.experiments.sensitivity_study import mode_objectives, sensitivity_vs_drop
from fqdetr.experiments.stopwatch import Stopwatch
from fqdetr.io import file_sha256
from fqdetr.models import load_detr_checkpoint
from fqdetr.models.checkpoint import read_checkpoint
from fqdetr.sensitivity import fisher_traces, hutchinson_traces

log = logging.getLogger(__name__)

BOOTSTRAP_SEED = 20261205  # one set of resamples for every arm and seed: differences are paired


@dataclass
class StudyConfig:
    """The study's settings (defaults: the full study of issue 16)."""
    critical: str = "person"
    modes: tuple = ("lse", "matched", "contrast")
    budget_bits: int = 4
    eval_images: int = 500
    fisher_images: int = 200
    qat_steps: int = 40
    bootstrap: int = 1000
    random_draws: int = 3
    hutchinson_probes: int = 2
    reg_lambda: float = 0.05
    upweight: float = 3.0
    finding1_mode: str = "matched"
    finding1_bits: int = 3
    finding1_images: int = None  # None: all the seed's Fisher images
    batch_size: int = 8
    image_size: int = None

    def __post_init__(self):
        self.modes = tuple(self.modes)
        bad = [m for m in self.modes + (self.finding1_mode,) if m not in MODES]
        if not self.modes or bad:
            raise ValueError(f"modes / finding1_mode: expected T_S modes among {MODES}, got {list(self.modes)} and "
                             f"{self.finding1_mode!r}")

    def as_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class SeedContext:
    """What every arm of one seed shares."""
    model: torch.nn.Module
    data: dict
    val: SplitEvaluator
    train: SplitEvaluator
    fisher_loader: object
    qat_loader: object
    criterion: object
    S: list
    canvas: int
    watch: Stopwatch


def seed_context(model_path, data_dir, cfg, seed):
    """Loads the model and data; the seed's Fisher / calibration images; the evaluators."""
    image_size, canvas = checkpoint_geometry(model_path, cfg.image_size)
    model = load_detr_checkpoint(model_path).eval()
    data = load_datasets(data_dir, image_size, max(cfg.eval_images, cfg.fisher_images, 400), cfg.eval_images,
                         class_names=class_names_of(read_checkpoint(model_path)))
    criterion, _, S, sets = critical_setup(model, data["val"], cfg.critical)
    n_val, n_train = min(cfg.eval_images, len(data["val"])), min(cfg.eval_images, len(data["train"]))
    watch = Stopwatch()
    val = SplitEvaluator(data["val"], range(n_val), canvas, sets, transformed=[cfg.critical],
                         resamples=cfg.bootstrap, seed=BOOTSTRAP_SEED, batch_size=cfg.batch_size, watch=watch)
    train = SplitEvaluator(data["train"], range(n_train), canvas, {cfg.critical: cfg.critical},
                           resamples=cfg.bootstrap, seed=BOOTSTRAP_SEED + 1, batch_size=cfg.batch_size, watch=watch)
    picked = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(seed))[:cfg.fisher_images]
    fisher_loader = make_loader(torch.utils.data.Subset(data["train"], sorted(picked.tolist())), cfg.batch_size,
                                canvas, shuffle=False)
    qat_loader = make_loader(data["train"], cfg.batch_size, canvas, shuffle=True, seed=seed)
    return SeedContext(model, data, val, train, fisher_loader, qat_loader, criterion, S, canvas, watch)


def arm_traces(uniform, ctx, cfg, seed):
    """{arm name: {layer: trace}} on copies of the uniform PTQ model: fisher-overall,
    fisher-critical-<mode> for each mode, hessian (Hutchinson, overall objective)."""
    objectives = {"fisher-overall": mode_objectives(ctx, ctx.S, cfg.modes[0])["overall"]}
    objectives.update({f"fisher-critical-{m}": mode_objectives(ctx, ctx.S, m)["critical"] for m in cfg.modes})
    with ctx.watch.stage("fisher"):
        traces = {name: fisher_traces(copy.deepcopy(uniform), ctx.fisher_loader, f, progress=False)
                  for name, f in objectives.items()}
    with ctx.watch.stage("hutchinson"):
        traces["hessian"] = hutchinson_traces(copy.deepcopy(uniform), ctx.fisher_loader,
                                              objectives["fisher-overall"], probes=cfg.hutchinson_probes, seed=seed,
                                              progress=False)
    return traces


def arm_allocations(uniform, traces, cfg, seed):
    """({arm name: {layer: weight bits}}, {layer: number of weights}), every allocation within the
    uniform model's size (budget_bits everywhere but the 8-bit first conv and heads)."""
    weights, bounds = layer_weights(uniform), fixed_bounds(uniform)
    sizes = {n: w.numel() for n, w in weights.items()}
    out = {"uniform": {n: 8 if n in bounds else cfg.budget_bits for n in sizes}}
    budget = sum(sizes[n] * b for n, b in out["uniform"].items())
    omega = {name: sensitivities(weights, tr) for name, tr in traces.items()}
    omega.update({f"random-{k}": random_sensitivity(sizes, seed=1000 * seed + k) for k in range(cfg.random_draws)})
    out.update({name: allocate_bits(o, sizes, budget, bounds=bounds) for name, o in omega.items()})
    return out, sizes


def qat_arms(ctx, allocation, cfg, seed):
    """{arm name: evaluation on val and train} of QAT plain / regularised / up-weighted."""
    with ctx.watch.stage("quantize + calibrate"):
        start = quantize_detr(ctx.model, allocation=allocation, calib_loader=ctx.fisher_loader)
    critical = mode_objectives(ctx, ctx.S, cfg.modes[0])["critical"]
    variants = {"qat": {}, "qat + fisher-trace reg": {"reg_lambda": cfg.reg_lambda},
                "qat + critical up-weighted": {"criterion": upweighted_criterion(ctx.criterion, ctx.S, cfg.upweight)}}
    out = {}
    for name, opts in variants.items():
        q = copy.deepcopy(start)
        seed_everything(seed)
        with ctx.watch.stage(f"{name} steps"):
            qat(q, opts.get("criterion", ctx.criterion), ctx.qat_loader, cfg.qat_steps, critical_objective=critical,
                reg_lambda=opts.get("reg_lambda", 0.0), progress=False)
        out[name] = {"val": ctx.val.evaluate(q), "train": ctx.train.evaluate(q)}
    return out


def run_seed(model_path, data_dir, cfg, seed):
    """Every arm of one seed: {"seed", "config", "arms": {name: {"val", ["train"]}}, "allocations",
    "traces", "traces_from", "finding1", "seconds"}."""
    start = time.time()
    seed_everything(seed)
    ctx = seed_context(model_path, data_dir, cfg, seed)
    arms = {"float": {"val": ctx.val.evaluate(ctx.model), "train": ctx.train.evaluate(ctx.model)}}
    with ctx.watch.stage("quantize + calibrate"):
        uniform = quantize_detr(ctx.model, w_bits=cfg.budget_bits, calib_loader=ctx.fisher_loader)
    traces = arm_traces(uniform, ctx, cfg, seed)
    allocations, sizes = arm_allocations(uniform, traces, cfg, seed)
    avg_bits = sum(sizes[n] * b for n, b in allocations["uniform"].items()) / sum(sizes.values())
    qat_start = f"fisher-critical-{cfg.modes[0]}"
    for name, alloc in allocations.items():
        with ctx.watch.stage("quantize + calibrate"):
            q = uniform if name == "uniform" else quantize_detr(ctx.model, allocation=alloc,
                                                                calib_loader=ctx.fisher_loader)
        arms[f"ptq {name}"] = {"val": ctx.val.evaluate(q)}
        if name == qat_start:  # QAT's starting point: the train-val gap before QAT
            arms[f"ptq {name}"]["train"] = ctx.train.evaluate(q)
    arms.update(qat_arms(ctx, allocations[qat_start], cfg, seed))
    with ctx.watch.stage("finding 1 (PTQ, Fisher per group)"):
        finding1 = sensitivity_vs_drop(ctx, uniform, cfg, float_val=arms["float"]["val"])
    return {"seed": seed, "config": cfg.as_dict(), "model": str(model_path), "model_sha256": file_sha256(model_path),
            "detector": family_of(ctx.model).title,
            "num_params": sum(p.numel() for p in ctx.model.parameters()), "num_classes": len(ctx.data["val"].cat_ids),
            "arms": arms, "allocations": allocations, "sizes": sizes, "avg_bits_all_layers": avg_bits, "traces": traces,
            "traces_from": f"uniform W{cfg.budget_bits}A8 PTQ model (fake-quantized, calibrated on this seed's "
                           f"{cfg.fisher_images} Fisher images), the model being allocated",
            "qat_start": f"ptq {qat_start}", "fisher_images": len(ctx.fisher_loader.dataset),
            "val_images": len(ctx.val.gt.imgs), "finding1": finding1, "seconds": time.time() - start,
            "stages": ctx.watch.stages}
