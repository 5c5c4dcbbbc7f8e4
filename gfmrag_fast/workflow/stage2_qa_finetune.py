"""GFM-RAG's command name for fine-tuning: ``python -m gfmrag_fast.workflow.stage2_qa_finetune``.

The fine-tune workflow (:mod:`.finetune`) with the config ``stage2_qa_finetune`` (the same
settings as ``finetune``), so GFM-RAG users' scripts keep working.
"""

import os

if __name__ == "__main__":  # before torch loads OpenMP: see gfmrag_fast/workflow/__init__.py
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from omegaconf import DictConfig

from .finetune import run


@hydra.main(config_path="config", config_name="stage2_qa_finetune", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
