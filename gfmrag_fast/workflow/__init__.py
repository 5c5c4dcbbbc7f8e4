"""Hydra entry points: ``python -m gfmrag_fast.workflow.finetune`` and ``... .pretrain``."""
