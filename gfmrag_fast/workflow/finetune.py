"""Fine-tune a GFM-RAG retriever: ``python -m gfmrag_fast.workflow.finetune [overrides]``.

Multi-GPU: ``torchrun --nproc_per_node=8 -m gfmrag_fast.workflow.finetune``; a KG too big for one GPU:
``torchrun --nproc_per_node=8 -m gfmrag_fast.workflow.finetune train.graph_partition=metis``.
"""

import os

if __name__ == "__main__":  # before torch loads OpenMP: see gfmrag_fast/workflow/__init__.py
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from .. import targets
from ..doc_rankers import HybridRanker
from ..training import Trainer
from ..training.distributed import shutdown
from ..training.qa_task import QAFinetuneTask, describe_qa_dataset
from ..runtime import configure_allocator
from . import config_help  # noqa: F401  (registers the resolver --help uses)
from .common import (
    apply_checkpoint, build_model_from_config, build_optimizer, dataset_options, graph_partition, scan_datasets, setup,
    text_emb_config, train_options,
)
from .startup import run_folder

log = logging.getLogger("gfmrag_fast")


def doc_ranker_factory(cfg: DictConfig):
    """``doc_ranker`` -> ``make(ent2doc)``: the ranker of each evaluated dataset."""
    spec = OmegaConf.to_container(cfg, resolve=True)
    if targets.resolve(spec.get("_target_"), "doc_ranker") is HybridRanker:
        raise ValueError("doc_ranker=hybrid and doc_ranker=dense rank by question-document similarity, which "
                         "fine-tuning does not evaluate: use them with python -m gfmrag_fast.workflow.evaluate "
                         "or GFMRetriever")
    return lambda ent2doc: targets.instantiate(spec, "doc_ranker", ent2doc)


def build_task(cfg: DictConfig, train_sets: list, valid_sets: list, device) -> QAFinetuneTask:
    return QAFinetuneTask(
        train_sets, valid_sets,
        losses=OmegaConf.to_container(cfg.task.losses, resolve=True), make_ranker=doc_ranker_factory(cfg.doc_ranker),
        metrics=cfg.task.metric, batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.train.get("eval_batch_size") or cfg.train.batch_size,
        init_entities_weight=cfg.train.init_entities_weight, fast_test=cfg.train.get("fast_test"),
        valid_fraction=cfg.train.valid_fraction, min_valid_questions=cfg.train.min_valid_questions,
        text_emb_conf=text_emb_config(cfg), device=device, seed=int(cfg.seed), **dataset_options(cfg),
        graph_partition=graph_partition(cfg),
    )


def run(cfg: DictConfig) -> dict:
    with run_folder() as folder:
        env, output_dir = setup(cfg)
        task = None
        try:
            # 1. data: stage-2 datasets (built once, cached), described now and loaded when needed
            train_sets, valid_sets = scan_datasets(cfg, "qa", env, describe_qa_dataset)

            # 2. model: GFM-RAG's GNNRetriever
            model = build_model_from_config(cfg, train_sets[0].info["feat_dim"])

            # 3. task, optimizer, trainer (resuming or starting from pre-trained weights)
            task = build_task(cfg, train_sets, valid_sets, env.device)
            optimizer = build_optimizer(cfg.optimizer, model.parameters())
            trainer = Trainer(model, optimizer, task, train_options(cfg, bool(valid_sets)), output_dir, env)
            apply_checkpoint(trainer, cfg.train.checkpoint, env)

            # 4. train, evaluating every valid dataset's test questions after each epoch
            folder.mark_used()
            result = trainer.fit()
            if env.is_main:
                log.info("best %s: %.4f; outputs in %s", cfg.task.best_metric, result["best_score"], output_dir)
                print(json.dumps({"best": {cfg.task.best_metric: result["best_score"]}, "output_dir": output_dir}))
            return result
        finally:
            if task is not None:
                task.datasets.close()
            shutdown(env)


@hydra.main(config_path="config", config_name="finetune", version_base=None)
def main(cfg: DictConfig) -> None:
    configure_allocator()  # glibc keeps large freed blocks for reuse (steps reallocate [B, N, d] tensors)
    run(cfg)


if __name__ == "__main__":
    main()
