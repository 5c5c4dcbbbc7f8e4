"""GFM-RAG's command name for fine-tuning: ``python -m gfmrag_fast.workflow.stage2_qa_finetune``.

The fine-tune workflow (:mod:`.finetune`) with the config ``stage2_qa_finetune`` (the same
settings as ``finetune``), so GFM-RAG users' scripts keep working.
"""

import hydra
from omegaconf import DictConfig

from .finetune import run


@hydra.main(config_path="config", config_name="stage2_qa_finetune", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
