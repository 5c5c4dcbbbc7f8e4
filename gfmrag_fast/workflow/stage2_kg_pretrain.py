"""GFM-RAG's command name for pre-training: ``python -m gfmrag_fast.workflow.stage2_kg_pretrain``.

The pre-train workflow (:mod:`.pretrain`) with the config ``stage2_kg_pretrain`` (the same
settings as ``pretrain``), so GFM-RAG users' scripts keep working.
"""

import os

if __name__ == "__main__":  # before torch loads OpenMP: see gfmrag_fast/workflow/__init__.py
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from omegaconf import DictConfig

from .pretrain import run


@hydra.main(config_path="config", config_name="stage2_kg_pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
