"""The fine-tuning task in-process: validation questions held out of training (or a dataset's own
valid split), evaluated as split "valid" beside "test", on small synthetic QA datasets."""

import logging
import re

import pytest
import torch

from gfmrag_fast.data import QADataset
from gfmrag_fast.metrics import retrieval_metrics
from gfmrag_fast.doc_rankers import IDFWeightedTopKRanker
from gfmrag_fast.training import DistEnv
from gfmrag_fast.training.qa_task import QAFinetuneTask, check_valid_options, describe_qa_dataset, hold_out

from helpers import HashEmb, small_model, write_chain_dataset

LOSSES = [{"name": "bce", "loss": {"_target_": "gfmrag.losses.BCELoss", "adversarial_temperature": 0.2},
           "cfg": {"weight": 0.3}}, {"name": "pcr", "loss": {"_target_": "gfmrag.losses.ListCELoss"},
                                     "cfg": {"weight": 0.7}}]


def write_chain(root, name, num_train, num_test=3, num_valid=0):
    """A chain of 8 entities (helpers.write_chain_dataset), loaded."""
    write_chain_dataset(root / name, 8, num_train, num_test, num_valid)
    return QADataset(str(root), name, text_emb_model=HashEmb())


def make_task(train_sets, valid_sets, **kwargs):
    return QAFinetuneTask(train_sets, valid_sets, LOSSES, IDFWeightedTopKRanker, ["mrr", "recall@2"], 4, 4, True,
                          None, {}, torch.device("cpu"), seed=7, **kwargs)


def trained_ids(task, epochs=2):
    ids = []
    for epoch in range(epochs):
        batches = list(task.train_batches(epoch, DistEnv()))
        assert len(batches) == task.num_batches(epoch, DistEnv())
        ids += [question for _, batch in batches for question in batch["ids"]]
    return ids


# --- the split itself --------------------------------------------------------------------------
def test_hold_out_is_seeded_disjoint_and_complete():
    valid, train = hold_out(70, 0.1, 5, seed=1024, name="musique_hippo")
    assert len(valid) == 7 and len(train) == 63  # the defaults on the bundled MuSiQue data
    assert sorted(valid.tolist() + train.tolist()) == list(range(70))
    assert valid.tolist() == sorted(valid.tolist()) and train.tolist() == sorted(train.tolist())
    again, _ = hold_out(70, 0.1, 5, seed=1024, name="musique_hippo")
    assert torch.equal(valid, again)
    assert not torch.equal(valid, hold_out(70, 0.1, 5, seed=1025, name="musique_hippo")[0])
    assert not torch.equal(valid, hold_out(70, 0.1, 5, seed=1024, name="other")[0])


@pytest.mark.parametrize("size, fraction, minimum, expected", [
    (70, 0.1, 5, 7), (20, 0.1, 5, 5), (10, 0.1, 5, 5), (9, 0.1, 5, None), (1, 0.1, 1, None), (2, 0.1, 1, 1),
    (20, 0.5, 1, 10), (100, 0.0, 5, None),
])
def test_hold_out_sizes(size, fraction, minimum, expected):
    parts = hold_out(size, fraction, minimum, seed=0, name="d")
    assert (None if parts is None else len(parts[0])) == expected


@pytest.mark.parametrize("fraction, minimum, message", [
    (0.6, 5, r"train\.valid_fraction must be in \[0, 0\.5\]"), (-0.1, 5, r"train\.valid_fraction must be in"),
    ("many", 5, r"train\.valid_fraction must be a number"), (0.1, 0, r"train\.min_valid_questions must be at least 1"),
    (0.1, 2.5, r"train\.min_valid_questions must be a whole number"),
    (0.1, True, r"train\.min_valid_questions must be a whole number"),
])
def test_bad_valid_options_name_the_key(fraction, minimum, message):
    with pytest.raises(ValueError, match=message):
        check_valid_options(fraction, minimum)


# --- the task ------------------------------------------------------------------------------------
def test_validation_questions_are_never_trained_on(tmp_path, one_thread):
    ds = write_chain(tmp_path, "chain", num_train=20)
    task = make_task([ds], [ds], valid_fraction=0.25, min_valid_questions=2)
    valid_items = task.eval_parts["chain"][0][2]
    assert [(row, split) for row, split, _ in task.eval_parts["chain"]] == [("valid", "train"), ("test", "test")]
    held = {ds.split("train").ids[i] for i in valid_items.tolist()}
    assert len(held) == 5 and task.train_sizes == [15]
    ids = trained_ids(task)
    assert not held & set(ids)
    assert sorted(set(ids)) == sorted(set(ds.split("train").ids) - held)
    assert len(ids) == 2 * 15  # every kept question once per epoch
    task.datasets.close()


def test_evaluate_gives_valid_rows_of_the_held_out_questions(tmp_path, one_thread):
    ds = write_chain(tmp_path, "chain", num_train=20)
    task = make_task([ds], [ds], valid_fraction=0.25, min_valid_questions=2)
    model = small_model("qa").eval()
    with torch.no_grad():
        rows = task.evaluate(model, DistEnv())
        assert [(r["dataset"], r["split"], r["questions"]) for r in rows] == [("chain", "valid", 5),
                                                                             ("chain", "test", 3)]
        assert set(rows[0]) == {"dataset", "split", "questions", "ent_mrr", "ent_recall@2", "doc_mrr",
                                "doc_recall@2"}
        # The valid row is the mean over exactly the held-out questions.
        state = task.datasets.get("chain")
        items = task.eval_parts["chain"][0][2].tolist()
        batch = task._batch("chain", "train", items)
        pred = model(state.graph, batch, entities_weight=state.entities_weight)
        expected = retrieval_metrics(pred, batch["supporting_entities_masks"], ["mrr"])["mrr"].mean().item()
    assert rows[0]["ent_mrr"] == pytest.approx(expected, rel=1e-6)
    task.datasets.close()


def test_a_dataset_with_a_valid_split_keeps_every_training_question(tmp_path, one_thread):
    ds = write_chain(tmp_path, "chain", num_train=20, num_test=4, num_valid=3)  # its own valid.json
    assert describe_qa_dataset(ds, train=True)["valid"] == 3
    task = make_task([ds], [ds])
    assert task.train_sizes == [20]
    assert [(row, split, items) for row, split, items in task.eval_parts["chain"]] == [
        ("valid", "valid", None), ("test", "test", None)]
    with torch.no_grad():
        rows = task.evaluate(small_model("qa").eval(), DistEnv())
    assert [(r["split"], r["questions"]) for r in rows] == [("valid", 3), ("test", 4)]
    task.datasets.close()


def test_a_dataset_too_small_to_hold_out_is_trained_whole_and_said(tmp_path, caplog, one_thread):
    ds = write_chain(tmp_path, "tiny", num_train=6)
    caplog.set_level(logging.INFO, logger="gfmrag_fast.training.qa_task")
    task = make_task([ds], [ds])  # defaults: 10 %, at least 5
    assert "tiny: only 6 training questions, fewer than the 10 needed to hold out validation questions" in caplog.text
    assert task.train_sizes == [6] and [row for row, _, _ in task.eval_parts["tiny"]] == ["test"]
    assert len(set(trained_ids(task, epochs=1))) == 6
    task.datasets.close()


def test_only_evaluated_training_datasets_give_validation_questions(tmp_path, caplog, one_thread):
    trained = write_chain(tmp_path, "trained", num_train=20)
    other = write_chain(tmp_path, "other", num_train=20)
    caplog.set_level(logging.INFO, logger="gfmrag_fast.training.qa_task")
    task = make_task([trained, other], [other], valid_fraction=0.25, min_valid_questions=2)
    # "trained" is not evaluated: holding its questions out would waste them.
    assert task.train_sizes == [20, 15] and task.valid_names == ["other"]
    assert "other: 5 of its 20 training questions are held out as validation questions" in caplog.text
    assert "trained:" not in caplog.text
    task.datasets.close()


def test_no_validation_when_the_fraction_is_zero(tmp_path, one_thread):
    ds = write_chain(tmp_path, "chain", num_train=20)
    task = make_task([ds], [ds], valid_fraction=0)
    assert task.train_sizes == [20] and [row for row, _, _ in task.eval_parts["chain"]] == ["test"]
    task.datasets.close()


def test_stage2_embedding_shows_progress_and_gives_the_same_vectors(tmp_path, caplog):
    """600 questions: embedded in chunks (512 + 88) with a progress line at each tenth of the way
    in a log (no terminal here); the vectors are those of one call on all of them."""
    caplog.set_level(logging.INFO, logger="gfmrag_fast.data.kg_dataset")
    ds = write_chain(tmp_path, "many", num_train=600)
    lines = re.findall(r"many: embedded (\d+) of 600 train questions \([\d.]+ texts/s, [\d.]+ s left\)", caplog.text)
    assert lines == ["512", "600"]
    texts = [f"q {i}?" for i in range(600)]
    assert torch.equal(ds.split("train").question_embeddings, HashEmb().encode(texts, is_query=True))
