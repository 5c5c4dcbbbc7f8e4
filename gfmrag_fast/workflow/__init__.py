"""Hydra entry points: ``python -m gfmrag_fast.workflow.finetune``, ``.pretrain``, ``.evaluate``
(and GFM-RAG's names ``.stage2_qa_finetune``, ``.stage2_kg_pretrain``).

Each entry module, when it runs as the program (``__name__ == "__main__"``), first sets
``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it): OpenMP threads then sleep, not spin,
in barriers. On a CPU shared with other processes, spinning threads made small-graph steps 20x
slower (2 s vs 0.1 s). OpenMP reads the variable when torch loads it, so it is set before the
entry module's imports; importing these modules as a library changes nothing.
"""
