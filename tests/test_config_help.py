"""``--help`` of the workflows: every setting with its value and its description from the config comments."""

import os
import subprocess
import sys

import pytest

from gfmrag_fast.workflow.config_help import parse_comments

# (module, overrides, lines that must appear: a setting and the start of its description)
CASES = [
    ("finetune", ["train.batch_size=3", "doc_ranker=topk_ranker"], [
        "train.batch_size=3\n    Questions per training step",
        "datasets.root=data\n    The folder holding one folder per dataset",
        "doc_ranker=topk_ranker\n    How documents are ranked",
        "doc_ranker.top_k=20\n    Entities per question that vote for documents.",
        "text_emb_model.text_emb_model_name=sentence-transformers/all-MiniLM-L6-v2\n    Hugging Face model id",
        "task.metric=[mrr, hits@1, hits@10, recall@2, recall@5]\n    Ranking metrics",
        "      mpnet: all-mpnet-base-v2 (768-d)",
    ]),
    ("pretrain", ["text_emb_model=mpnet"], [
        "task.strict_negative=true\n    Negatives are never true answers",
        "text_emb_model.text_emb_model_name=sentence-transformers/all-mpnet-base-v2\n",
        "Pre-training a GFM-RAG graph model on knowledge-graph completion",
    ]),
    ("evaluate", [], [
        "train.checkpoint=???\n    The trained retriever",
        "retrieval.entity_linker.max_entities=5\n    Most entities linked per question.",
    ]),
    ("stage2_qa_finetune", [], ["Fine-tuning a GFM-RAG retriever", "task.best_metric=doc_recall@5\n    on the validation questions"]),
    ("stage2_kg_pretrain", [], ["task.num_negative=256\n    Negative answers drawn per training triple"]),
]


@pytest.mark.parametrize("module,overrides,expected", CASES, ids=[case[0] for case in CASES])
def test_help_describes_every_setting(module, overrides, expected, tmp_path):
    result = subprocess.run([sys.executable, "-m", f"gfmrag_fast.workflow.{module}", "--help", *overrides],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith(f"python -m gfmrag_fast.workflow.{module} ")
    for text in expected:
        assert text in out, text
    undescribed = [line for line, below in zip(out.splitlines(), out.splitlines()[1:]) if "(no description)" in below]
    assert not undescribed, f"settings without a comment in the config: {undescribed}"
    assert "train.timeout" not in out  # a dead key (the top-level timeout is the one used)
    if module in ("finetune", "stage2_qa_finetune"):
        assert "timeout=60" in out and "strict_negative" not in out  # no negatives are sampled in fine-tuning
    assert not os.listdir(tmp_path)  # --help runs nothing and creates no run folder


def test_comment_parsing():
    header, keys = parse_comments(
        "# What this file is.\n"
        "#   with an example line\n"
        "\n"
        "# The section.\n"
        "section:\n"
        "  # Above the key,\n"
        "  # two lines.\n"
        "  key: 1  # and after it\n"
        "  url: 'a#b'  # the # in quotes is the value's\n"
        "\n"
        "  # A blank line separates this comment from the key.\n"
        "\n"
        "  bare: 2\n"
        "  nested:\n"
        "    leaf: x#y\n"
        "  items:\n"
        "    - name: a  # inside a list\n"
        "top: 3  # back at the top\n"
    )
    assert header == "What this file is.\n  with an example line"
    assert keys == {
        "section": "The section.",
        "section.key": "Above the key, two lines. and after it",
        "section.url": "the # in quotes is the value's",
        "section.items.name": "inside a list",
        "top": "back at the top",
    }


def test_a_comment_directly_above_the_first_key_is_not_the_header():
    header, keys = parse_comments("# Describes the key.\nkey: 1\n")
    assert header == "" and keys == {"key": "Describes the key."}
