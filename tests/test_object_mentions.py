"""Object-mention F1 (captioner.metrics.objects): the COCO object table, mentions, the >= 2 references rule."""

import pytest

from captioner.metrics import compute_scores, load_object_table, object_mention_f1
from captioner.metrics.objects import ObjectTable, ObjectTableError, f1_from_counts
from captioner.text import tokenize


def mentions(caption: str) -> set[str]:
    return load_object_table().mentions(tokenize(caption))


def test_table_has_cocos_80_categories_with_their_forms():
    table = load_object_table()
    assert len(table.categories) == 80 and len(set(table.categories)) == 80
    for category, form in [("person", "women"), ("person", "kids"), ("dining table", "table"),
                           ("cell phone", "cellphone"), ("tv", "television"), ("motorcycle", "motorbike"),
                           ("airplane", "jets"), ("couch", "sofa"), ("refrigerator", "fridge"),
                           ("donut", "doughnuts"), ("hot dog", "hot dog")]:
        assert tuple(form.split()) in table.forms[category], (category, form)
    assert ("orange",) not in table.forms["orange"]  # the colour, far more often than the fruit


@pytest.mark.parametrize("caption, expected", [
    ("Two Women sit on a sofa, watching TV.", {"person", "couch", "tv"}),
    ("A man eats a hot dog", {"person", "hot dog"}),  # not also a dog
    ("a dog with a teddy bear", {"dog", "teddy bear"}),  # not also a bear
    ("a brown bear in the water", {"bear"}),
    ("a woman talking on her cell phone", {"person", "cell phone"}),
    ("planes parked at the airport", {"airplane"}),
    ("a man in an orange shirt", {"person"}),
    ("a bowl of oranges on a dining table", {"bowl", "orange", "dining table"}),
    ("the stop sign near a traffic light", {"stop sign", "traffic light"}),
    ("", set()),
])
def test_mentions_plurals_synonyms_and_longest_form_first(caption, expected):
    assert mentions(caption) == expected


def test_truth_needs_two_references_and_counts_pool_over_images():
    references = {
        # dog: 3 references; cat: 2; frisbee: only 1, so not true
        1: ["A dog catches a frisbee", "two dogs and a cat", "a puppy and a kitten", "a grassy field", "a yard"],
        # person: 2 (man, kids); bus: 1
        2: ["a man by a bus", "kids on a street", "a street", "a road", "a city"],
    }
    captions = {1: "a dog and a frisbee",  # dog right, frisbee wrong (1 reference), cat missed
                2: "a woman in the street"}  # person right
    result = object_mention_f1(references, captions)
    assert (result["true_positives"], result["false_positives"], result["false_negatives"]) == (2, 1, 1)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3) and result["images"] == 2
    assert result["per_image"][2] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert result["per_image"][1]["f1"] == pytest.approx(0.5)
    # with a threshold of 1 reference the frisbee and the bus become true
    loose = object_mention_f1(references, captions, min_references=1)
    assert (loose["true_positives"], loose["false_positives"], loose["false_negatives"]) == (3, 0, 2)


def test_an_image_with_one_reference_is_judged_by_it():
    result = object_mention_f1({"a": ["a cat on a bed"]}, {"a": "a cat"})
    assert (result["true_positives"], result["false_negatives"]) == (1, 1)


def test_f1_edge_cases():
    assert f1_from_counts(0, 0, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}  # nothing, and nothing said
    assert f1_from_counts(0, 0, 3) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # said nothing
    assert f1_from_counts(0, 2, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # said only wrong things
    assert f1_from_counts(3, 1, 2)["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))


def test_bad_inputs_and_tables_are_refused():
    with pytest.raises(ValueError, match="same image ids"):
        object_mention_f1({"a": ["a dog"]}, {"b": "a dog"})
    with pytest.raises(ValueError, match="min_references"):
        object_mention_f1({"a": ["a dog"]}, {"a": "a dog"}, min_references=0)
    with pytest.raises(ObjectTableError, match="belongs to both 'cat' and 'kitten'"):
        ObjectTable.from_forms({"cat": ["cat", "kitty"], "kitten": ["kitty"]})
    with pytest.raises(ObjectTableError, match="not lowercase tokens"):
        ObjectTable.from_forms({"tv": ["T.V."]})


def test_compute_scores_reports_it_beside_the_others():
    references = {1: ["a dog on the grass", "a brown dog runs"], 2: ["a cat on a sofa", "a cat sleeps on a couch"]}
    scores = compute_scores(references, {1: "a dog runs", 2: "a dog on a sofa"})
    # image 1: dog right; image 2: dog wrong, cat missed, couch right -> tp 2, fp 1, fn 1
    assert scores["Obj-F1"] == pytest.approx(2 / 3)
    assert scores["per_image"][1]["Obj-F1"] == 1.0 and scores["per_image"][2]["Obj-F1"] == pytest.approx(0.5)
