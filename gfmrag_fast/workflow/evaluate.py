"""Evaluate a trained retriever without training: ``python -m gfmrag_fast.workflow.evaluate train.checkpoint=...``.

``train.checkpoint``: a fine-tune run folder, a pre-trained folder, a training checkpoint file of
a run, or a Hugging Face repo id. Writes into the run folder:

* ``metrics.jsonl``: one row per dataset, the fine-tune's keys (``dataset``, ``split``,
  ``questions``, ``ent_*``, ``doc_*``) plus ``checkpoint``, ``doc_ranker``, ``entities`` and,
  with ``retrieval.entities=linked``, the linking precision and recall;
* ``predictions.jsonl``: per question its dataset, id, question, entities used, top documents
  with scores and gold documents.
"""

import os

if __name__ == "__main__":  # before torch loads OpenMP: see gfmrag_fast/workflow/__init__.py
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from ..atomic_io import atomic_jsonl
from ..data import load_datasets
from ..retrieval import GFMRetriever, load_checkpoint, text_model_from_config
from ..retrieval.evaluation import evaluate_split
from ..retrieval.loading import RUN_CHECKPOINTS
from ..text_emb import TextEmbModel
from ..runtime import configure_allocator
from . import config_help  # noqa: F401  (registers the resolver --help uses)
from .startup import RunFolder, datasets_root, log_overrides, run_folder

log = logging.getLogger("gfmrag_fast")


def text_model(cfg: DictConfig, checkpoint_text_config):
    """The user's ``text_emb_model`` config when one is chosen, else the checkpoint's own text
    model (which can never enable ``trust_remote_code``: only ``retrieval.trust_remote_code`` can)."""
    trust = bool(cfg.retrieval.get("trust_remote_code", False))
    if cfg.get("text_emb_model"):
        conf = OmegaConf.to_container(cfg.text_emb_model, resolve=True)
        conf["trust_remote_code"] = bool(conf.get("trust_remote_code")) or trust
        return TextEmbModel.from_config(conf)
    if checkpoint_text_config is None:
        log.warning("the checkpoint does not say which text model it was trained with: using the default "
                    "(choose one with text_emb_model=minilm|mpnet)")
    return text_model_from_config(checkpoint_text_config, trust_remote_code=trust)


def run(cfg: DictConfig) -> list:
    from hydra.core.hydra_config import HydraConfig

    with run_folder() as folder:
        output_dir = HydraConfig.get().runtime.output_dir
        if any(os.path.exists(os.path.join(output_dir, name)) for name in RUN_CHECKPOINTS):
            raise ValueError(f"{output_dir} is a training run folder: evaluate into another hydra.run.dir, so that "
                             "its metrics.jsonl is not replaced")
        if not cfg.datasets.valid_names:
            raise ValueError("datasets.valid_names is empty: nothing to evaluate")
        log_overrides(cfg)
        datasets_root(cfg, list(cfg.datasets.valid_names))

        # 1. model and the text model it was trained with
        model, checkpoint_text_config = load_checkpoint(cfg.train.checkpoint)
        text_emb_model = text_model(cfg, checkpoint_text_config)
        return evaluate(cfg, model, text_emb_model, output_dir, folder)


def evaluate(cfg: DictConfig, model, text_emb_model, output_dir: str, folder: RunFolder) -> list:
    """Retrieves for every question of ``datasets.valid_names`` and writes the outputs; the run
    folder is the run's (kept whatever happens) from the first dataset loaded on."""
    # 2. data: stage-2 datasets (built once, cached), loaded one at a time: only the dataset being
    # evaluated is in memory (a run may name dozens)
    options = OmegaConf.to_container(cfg.datasets.get("cfgs") or {}, resolve=True)
    datasets = (load_datasets(cfg.datasets.root, [name], kind="qa", text_emb_model=text_emb_model, **options)[0]
                for name in cfg.datasets.valid_names)

    # 3. retrieve for each dataset's questions, score against the gold documents and entities
    rows, predictions = [], []
    ranker = OmegaConf.to_container(cfg.doc_ranker, resolve=True)
    for ds in datasets:
        retriever = GFMRetriever(model, ds, doc_ranker=ranker, device=cfg.train.device,
                                 init_entities_weight=bool(cfg.train.init_entities_weight),
                                 batch_size=int(cfg.train.eval_batch_size),
                                 entity_linker=OmegaConf.to_container(cfg.retrieval.entity_linker, resolve=True))
        folder.mark_used()
        row, found = evaluate_split(retriever, ds.split(cfg.retrieval.split), list(cfg.task.metric),
                                    entities=cfg.retrieval.entities, top_k=int(cfg.retrieval.top_k),
                                    limit=cfg.train.fast_test)
        rows.append({**row, "checkpoint": str(cfg.train.checkpoint), "doc_ranker": ranker})
        predictions += [{"dataset": ds.data_name, **p} for p in found]
        log.info("evaluation %s", rows[-1])
        del retriever, ds  # freed before the next dataset loads

    # 4. save
    atomic_jsonl(rows, os.path.join(output_dir, "metrics.jsonl"))
    atomic_jsonl(predictions, os.path.join(output_dir, "predictions.jsonl"))
    print(json.dumps({"metrics": rows, "output_dir": output_dir}))
    return rows


@hydra.main(config_path="config", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    configure_allocator()  # glibc keeps large freed blocks for reuse (steps reallocate [B, N, d] tensors)
    run(cfg)


if __name__ == "__main__":
    main()
