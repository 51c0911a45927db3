"""Training and evaluation loops (plain keyword arguments; argparse lives in fqdetr.cli)."""
from fqdetr.engine.checkpoint import (atomic_torch_save, capture_rng_state, load_training_checkpoint,
                                      restore_rng_state, save_training_checkpoint, seed_everything)
from fqdetr.engine.evaluate import coco_dataset_of, evaluate_model, predict, to_coco_results
from fqdetr.engine.loader import ResumableSampler, make_loader
from fqdetr.engine.train import (TrainConfig, build_optimizer, build_scheduler, param_groups, train_detr,
                                 train_step)

__all__ = ["atomic_torch_save", "capture_rng_state", "load_training_checkpoint", "restore_rng_state",
           "save_training_checkpoint", "seed_everything", "coco_dataset_of", "evaluate_model", "predict",
           "to_coco_results", "ResumableSampler", "make_loader", "build_optimizer",
           "build_scheduler", "param_groups", "TrainConfig", "train_detr", "train_step"]
