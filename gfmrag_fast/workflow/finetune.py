"""Fine-tune a GFM-RAG retriever: ``python -m gfmrag_fast.workflow.finetune [overrides]``.

Multi-GPU: ``torchrun --nproc_per_node=8 -m gfmrag_fast.workflow.finetune``; a KG too big for one GPU:
``torchrun --nproc_per_node=8 -m gfmrag_fast.workflow.finetune train.graph_partition=metis``.
"""

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from ..models.doc_ranker import DOC_RANKERS
from ..training import Trainer
from ..training.distributed import shutdown
from ..training.qa_task import QAFinetuneTask, describe_qa_dataset
from .common import (
    apply_checkpoint, build_model_from_config, build_optimizer, dataset_options, graph_partition, scan_datasets, setup,
    text_emb_config, train_options,
)

log = logging.getLogger("gfmrag_fast")


def doc_ranker_factory(cfg: DictConfig):
    spec = OmegaConf.to_container(cfg, resolve=True)
    name = str(spec.pop("_target_")).rsplit(".", 1)[-1]
    if name == "HybridRanker":
        raise ValueError("doc_ranker=hybrid and doc_ranker=dense rank by question-document similarity, which "
                         "fine-tuning does not evaluate: use them with python -m gfmrag_fast.workflow.evaluate "
                         "or GFMRetriever")
    if name not in DOC_RANKERS:
        raise ValueError(f"doc_ranker._target_ {name!r} is unknown; known: {sorted(DOC_RANKERS)}")
    return lambda ent2doc: DOC_RANKERS[name](ent2doc, **spec)


def run(cfg: DictConfig) -> dict:
    env, output_dir = setup(cfg)
    task = None
    try:
        # 1. data: stage-2 datasets (built once, cached), described now and loaded when needed
        if not cfg.datasets.train_names:
            raise ValueError("datasets.train_names is empty: nothing to fine-tune on")
        training = set(cfg.datasets.train_names)
        names = list(dict.fromkeys([*cfg.datasets.train_names, *cfg.datasets.valid_names]))
        datasets = dict(zip(names, scan_datasets(
            cfg, names, "qa", env, lambda ds: describe_qa_dataset(ds, train=ds.data_name in training))))
        train_sets = [datasets[name] for name in cfg.datasets.train_names]
        valid_sets = [datasets[name] for name in cfg.datasets.valid_names]
        feat_dim = train_sets[0].info["feat_dim"]

        # 2. model: GFM-RAG's GNNRetriever
        model = build_model_from_config(cfg, feat_dim)

        # 3. task, optimizer, trainer (resuming or starting from pre-trained weights)
        task = QAFinetuneTask(
            train_sets, valid_sets, OmegaConf.to_container(cfg.task.losses, resolve=True),
            doc_ranker_factory(cfg.doc_ranker), cfg.task.metric, cfg.train.batch_size,
            cfg.train.get("eval_batch_size", cfg.train.batch_size), cfg.train.init_entities_weight,
            cfg.train.fast_test, text_emb_config(cfg), env.device, seed=int(cfg.seed), **dataset_options(cfg),
            graph_partition=graph_partition(cfg),
        )
        optimizer = build_optimizer(cfg.optimizer, model.parameters())
        trainer = Trainer(model, optimizer, task, train_options(cfg, bool(valid_sets)), output_dir, env)
        apply_checkpoint(trainer, cfg.train.checkpoint, env)

        # 4. train, evaluating every valid dataset's test questions after each epoch
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
    run(cfg)


if __name__ == "__main__":
    main()
