"""Calibration of activation scales over a few batches (weights calibrate from
themselves when a module is created or its bits change)."""
import logging
from collections.abc import Mapping

import torch
from tqdm import tqdm

from fqdetr.quant.quantizer import Quantizer

log = logging.getLogger(__name__)


def _activation_quantizers(model):
    return [m for m in model.modules() if isinstance(m, Quantizer) and m.axis is None]


def _call_model(model, batch):
    """model(**batch) for a mapping of keyword inputs, else model(batch)."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


@torch.no_grad()
def calibrate(model, batches, forward_fn=None, method=None, num_batches=None, progress=True):
    """Sets every activation scale from data seen over ``batches``.

    batches: iterable of inputs. A mapping runs ``model(**batch)`` (keyword inputs, e.g.
    {"pixel_values": images [B, 3, H, W]} for a transformers DETR); anything else, a tuple
    included, runs ``model(batch)`` (fqdetr's DETR takes (images, mask) as one argument).
    forward_fn(model, batch): runs the model on one batch in place of that rule; its result is
    ignored (the quantizers observe their inputs on the way).
    method: override every quantizer's method ("max" | "percentile" | "mse"); weight scales
    are recomputed with it too. num_batches: stop after that many batches.
    If a batch raises, the quantizers stop observing (nothing observed is kept) and get their
    methods back; scales set before the call stay as they were.
    """
    forward_fn = forward_fn or _call_model
    quantizers = _activation_quantizers(model)
    all_quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    old_methods = [q.method for q in all_quantizers]
    if method is not None:
        for q in all_quantizers:
            q.method = method
    for q in quantizers:
        q.start_observing()
    try:
        seen = _run_batches(model, batches, forward_fn, num_batches, progress)
    except BaseException:
        for q, old in zip(all_quantizers, old_methods):
            q.method = old
        for q in quantizers:
            q.stop_observing()
        raise
    for q in quantizers:
        q.finish_observing()
    if method is not None:
        _recalibrate_weights(model)
    log.info("calibrated %d activation quantizer(s) on %d batch(es)", len(quantizers), seen)


def _run_batches(model, batches, forward_fn, num_batches, progress):
    """Runs forward_fn over the batches in eval mode (then restores each module's mode); returns
    their number."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    seen = 0
    try:
        for batch in tqdm(batches, total=num_batches, desc="calibrate", disable=not progress, leave=False):
            forward_fn(model, batch)
            seen += 1
            if num_batches is not None and seen >= num_batches:
                break
    finally:
        for module, training in modes:
            module.training = training
    if seen == 0:
        raise ValueError("batches: expected at least one calibration batch, got none")
    return seen


def _recalibrate_weights(model):
    for module in model.modules():
        wq = getattr(module, "weight_quantizer", None)
        if wq is not None:
            weight = module.in_proj_weight if hasattr(module, "in_proj_weight") else module.weight
            wq.init_from(weight)
