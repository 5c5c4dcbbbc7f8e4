"""Names in the JSON files match kg.txt's ignoring case, spacing and punctuation; counted once."""

import json
import logging

import pytest

from gfmrag_fast.data import QADataset
from gfmrag_fast.data.readers import NameIndex, normalize_name

from helpers import HashEmb


@pytest.mark.parametrize("name, expected", [
    ("New-York", "new york"),
    ("  NEW   YORK! ", "new york"),
    ("new\tyork", "new york"),
    ("betrayed (1917 film)", "betrayed 1917 film"),  # GFM-RAG's kg.txt: "betrayed  1917 film"
    ("betrayed  1917 film", "betrayed 1917 film"),
    ("Alice's", "alice s"),
    ("snake_case", "snake case"),
    ("Ｐａｒｉｓ", "paris"),  # full-width letters (NFKC)
    ("Straße", "strasse"),  # case folding, not only lower()
    ("Zürich", "zürich"),  # letters outside ASCII are kept
    ("!!!", ""),
])
def test_normalize_name(name, expected):
    assert normalize_name(name) == expected


def test_name_index_prefers_exact_and_refuses_ambiguous():
    index = NameIndex({"paris": 0, "Paris": 1, "new york": 2, "betrayed  1917 film": 3})
    assert index.get(" paris ") == 0 and index.get("Paris") == 1  # exact, after stripping
    assert index.get("PARIS") is None  # fits both "paris" and "Paris"
    assert index.get("New-York") == 2 and index.get("Betrayed (1917 film)") == 3
    assert index.get("london") is None and index.get("") is None
    assert index.counts == {"exact": 2, "normalized": 2, "unknown": 3}


def write(root, name, train):
    stage1 = root / name / "processed" / "stage1"
    stage1.mkdir(parents=True)
    (stage1 / "kg.txt").write_text("marie curie,born in,warsaw\nwarsaw,capital of,poland\nnew york,in,usa\n")
    (stage1 / "document2entities.json").write_text(json.dumps({
        "Curie": ["Marie Curie", "warsaw"], "Warsaw": ["WARSAW", "poland", "atlantis"], "NY": ["new-york"]}))
    (stage1 / "train.json").write_text(json.dumps(train))


def question(qe, se, docs):
    return {"question": "q?", "question_entities": qe, "supporting_entities": se, "supporting_facts": docs}


def test_question_names_are_normalised_and_unmatched_reported_once(tmp_path, caplog):
    train = [
        question(["Marie Curie"], ["Warsaw", "Poland!"], ["Curie"]),
        question(["marie-curie", "Pierre Curie"], ["poland"], ["Warsaw", "Nowhere"]),
        question(["nobody"], ["warsaw"], ["Curie"]),  # skipped: no known question entity
        question(["NEW YORK"], ["u.s.a"], ["ny"]),  # "u.s.a" is "u s a", not "usa": unknown
    ]
    write(tmp_path, "ds", train)
    with caplog.at_level(logging.INFO, logger="gfmrag_fast.data.qa_dataset"):
        ds = QADataset(str(tmp_path), "ds", text_emb_model=HashEmb())
    ent = ds.ent2id
    items = ds.split("train")
    assert items[0]["question_entities"].tolist() == [ent["marie curie"]]
    assert items[0]["supporting_entities"].tolist() == [ent["warsaw"], ent["poland"]]
    assert items[1]["question_entities"].tolist() == [ent["marie curie"]]
    assert items[1]["supporting_docs"].tolist() == [ds.doc2id["Warsaw"]]
    assert len(items) == 2  # question 3 skipped, question 4 has no known supporting entity
    # document2entities.json names are normalised too: "Marie Curie", "WARSAW", "new-york" found
    assert ds.ent2doc.to_dense()[ent["new york"], ds.doc2id["NY"]] == 1
    assert ds.ent2doc.to_dense()[ent["warsaw"], ds.doc2id["Warsaw"]] == 1
    assert ds.stats["documents"]["unknown_entities"] == 1  # atlantis
    s = ds.stats["train"]
    assert (s["unknown_question_entities"], s["unknown_supporting_entities"], s["unknown_supporting_docs"]) == (2, 1, 1)
    # normalised: Marie Curie, WARSAW, new-york (d2e); Marie Curie, Warsaw, Poland!, marie-curie,
    # NEW YORK, ny (train); unknown: atlantis; Pierre Curie, nobody, u.s.a, Nowhere
    assert ds.stats["names"]["normalized"] == 9 and ds.stats["names"]["unknown"] == 5

    lines = [r for r in caplog.records if "only after normalising" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    assert "ds: 9 name(s) matched" in message and "5 name(s) not found" in message
    assert "train.json: 2 question entities, 1 supporting entities, 1 supporting docs" in message

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gfmrag_fast.data.qa_dataset"):
        QADataset(str(tmp_path), "ds", text_emb_model=HashEmb())  # from the cache: not said again
    assert not [r for r in caplog.records if "only after normalising" in r.getMessage()]


def test_no_name_line_when_everything_matches_as_written(tmp_path, caplog):
    write(tmp_path, "clean", [question(["marie curie"], ["warsaw"], ["Curie"])])
    stage1 = tmp_path / "clean" / "processed" / "stage1"
    (stage1 / "document2entities.json").write_text(json.dumps({"Curie": ["marie curie", "warsaw"]}))
    with caplog.at_level(logging.INFO, logger="gfmrag_fast.data.qa_dataset"):
        ds = QADataset(str(tmp_path), "clean", text_emb_model=HashEmb())
    assert ds.stats["names"] == {"exact": 5, "normalized": 0, "unknown": 0}
    assert not [r for r in caplog.records if "only after normalising" in r.getMessage()]
