"""Training, QAT and evaluation loops, the one data loader factory, checkpoints and torch.distributed
helpers (argparse lives in fqdetr.cli; experiment drivers in fqdetr.experiments)."""
from fqdetr.engine.checkpoint import (capture_rng_state, load_training_checkpoint, restore_rng_state,
                                      save_training_checkpoint, seed_everything)
from fqdetr.engine.evaluate import coco_dataset_of, evaluate_model, predict, to_coco_results
from fqdetr.engine.loader import ResumableSampler, make_loader
from fqdetr.engine.train import (TrainConfig, build_optimizer, build_scheduler, param_groups, train_detr,
                                 train_step)

__all__ = ["capture_rng_state", "load_training_checkpoint", "restore_rng_state",
           "save_training_checkpoint", "seed_everything", "coco_dataset_of", "evaluate_model", "predict",
           "to_coco_results", "ResumableSampler", "make_loader", "build_optimizer",
           "build_scheduler", "param_groups", "TrainConfig", "train_detr", "train_step"]
