"""Pre-train a GFM-RAG graph model on KG completion: ``python -m gfmrag_fast.workflow.pretrain [overrides]``.

Multi-GPU: ``torchrun --nproc_per_node=8 -m gfmrag_fast.workflow.pretrain``; a KG too big for one GPU:
``torchrun --nproc_per_node=8 -m gfmrag_fast.workflow.pretrain train.graph_partition=metis``.
"""

import os

if __name__ == "__main__":  # before torch loads OpenMP: see gfmrag_fast/workflow/__init__.py
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import logging
import math

import hydra
from omegaconf import DictConfig

from ..atomic_io import read_jsonl
from ..training import Trainer
from ..training.distributed import shutdown
from ..training.kg_task import KGCompletionTask, describe_kg_dataset
from ..runtime import configure_allocator
from . import config_help  # noqa: F401  (registers the resolver --help uses)
from .common import (
    apply_checkpoint, build_model_from_config, build_optimizer, dataset_options, graph_partition, scan_datasets, setup,
    text_emb_config, train_options,
)
from .startup import run_folder

log = logging.getLogger("gfmrag_fast")


def build_task(cfg: DictConfig, train_sets: list, valid_sets: list, device) -> KGCompletionTask:
    return KGCompletionTask(
        train_sets, valid_sets,
        num_negative=cfg.task.num_negative, strict_negative=cfg.task.strict_negative,
        adversarial_temperature=cfg.task.adversarial_temperature,
        batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.get("eval_batch_size") or cfg.train.batch_size,
        metrics=cfg.task.metric, fast_test=cfg.train.get("fast_test"),
        text_emb_conf=text_emb_config(cfg), device=device, seed=int(cfg.seed), **dataset_options(cfg),
        graph_partition=graph_partition(cfg),
    )


def final_metrics(output_dir: str, history: list, metric: str) -> list:
    """The evaluation rows of the best epoch, from metrics.jsonl ([] when nothing was evaluated)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not history or not os.path.exists(path):
        return []
    scored = [h for h in history if metric in h]
    epoch = max(scored, key=lambda h: h[metric])["epoch"] if scored else history[-1]["epoch"]
    rows = read_jsonl(path)
    if not any(row.get("epoch") == epoch for row in rows) and rows:
        epoch = rows[-1].get("epoch")  # resumed into a new folder: earlier epochs are elsewhere
    return [row for row in rows if row.get("epoch") == epoch]


def run(cfg: DictConfig) -> dict:
    with run_folder() as folder:
        env, output_dir = setup(cfg)
        task = None
        try:
            # 1. data: stage-2 KG datasets (built once, cached), described now and loaded when needed
            train_sets, valid_sets = scan_datasets(cfg, "kg", env, describe_kg_dataset)

            # 2. model: GFM-RAG's QueryGNN + EntityNBFNet over the relation-name embeddings
            model = build_model_from_config(cfg, train_sets[0].info["feat_dim"])

            # 3. task, optimizer, trainer (resuming or starting from pre-trained weights)
            task = build_task(cfg, train_sets, valid_sets, env.device)
            optimizer = build_optimizer(cfg.optimizer, model.parameters())
            # The best epoch is picked on valid rows only, never on test.
            options = train_options(cfg, bool(valid_sets), metric_split="valid")
            trainer = Trainer(model, optimizer, task, options, output_dir, env)
            apply_checkpoint(trainer, cfg.train.checkpoint, env)

            # 4. train, evaluating filtered link prediction after each epoch; report the best epoch
            folder.mark_used()
            result = trainer.fit()
            if env.is_main:
                rows = final_metrics(output_dir, result["history"], cfg.task.best_metric)
                for row in rows:
                    log.info("final %s", row)
                best = result["best_score"] if math.isfinite(result["best_score"]) else None  # None: not evaluated
                print(json.dumps({"best": {cfg.task.best_metric: best}, "metrics": rows, "output_dir": output_dir}))
            return result
        finally:
            if task is not None:
                task.datasets.close()
            shutdown(env)


@hydra.main(config_path="config", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    configure_allocator()  # glibc keeps large freed blocks for reuse (steps reallocate [B, N, d] tensors)
    run(cfg)


if __name__ == "__main__":
    main()
