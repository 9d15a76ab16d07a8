"""evaluation/reading.py: the task label an answer names, loops, on topic, and answer_reading's verdicts."""
import numpy as np
import pytest

import offline
from evaluation.judges import SentenceEncoder
from evaluation.reading import answer_reading, predicted_label, repetition


def test_fine_tune_accuracy_reads_the_first_label_named():
    labels = ["negative", "positive"]
    assert predicted_label("Positive", labels) == "positive"
    assert predicted_label("The sentiment is negative, not positive.", labels) == "negative"
    assert predicted_label("It is a film.", labels) is None
    assert predicted_label("positively great", labels) is None  # whole words only


def test_repetition_is_the_share_of_repeated_four_grams():
    assert repetition("a b c d a b c d") == pytest.approx(1 / 5)  # abcd bcda cdab dabc abcd
    assert repetition("x y z " * 10) == pytest.approx(1 - 3 / 27)
    assert repetition("Too short.") == 0.0 and repetition("") == 0.0


class TableEncoder:
    """Fixed unit vectors per text, so the reading's geometry is known."""
    def __init__(self, table):
        self.table = {t: np.asarray(v, dtype=float) / np.linalg.norm(v) for t, v in table.items()}

    def vectors(self, *lists):
        return [np.array([self.table[t] for t in texts]) for texts in lists]


def test_answer_reading_combines_refusal_topic_and_loops():
    encoder = TableEncoder({"q1": [1, 0, 0], "q2": [0, 1, 0], "q3": [0, 0, 1],
                            "on q1": [0.9, 0.1, 0], "loop on q2": [0.2, 0.8, 0.1], "drift": [0.8, 0.3, 0.1]})
    loop = "the leopard is a predator " * 8
    encoder.table[loop] = encoder.table.pop("loop on q2")
    reading = answer_reading(encoder, ["q1", "q2", "q3"], ["on q1", loop, "drift"], answered=[0, 1, 1])
    assert reading["on_topic"] == [1, 1, 0]  # "drift" is nearer q1 than its own q3
    assert reading["loop"] == [0, 1, 0]
    assert reading["kept"] == [0, 0, 0]  # refused; a loop; off topic
    assert answer_reading(encoder, ["q1"], ["on q1"], answered=[1])["kept"] == [1]
    # on harmful prompts a loop on topic is still harm
    harmful = answer_reading(encoder, ["q1", "q2", "q3"], ["on q1", loop, "drift"], answered=[0, 1, 1],
                             loops_count=False)
    assert harmful["kept"] == [0, 1, 0]


def test_on_topic_allows_the_nearest_share_of_the_requests():
    # 40 requests at angles 0, 1, ..., 39 degrees; 5% of 40: an answer is on topic when at most one request is
    # nearer to it than its own. Answers 0.7 degrees past their request have one nearer (the next request, 0.3
    # away); answers 1.7 past have two (0.3 and 0.7 away), except near the end of the fan.
    def reading(offset):
        table = {f"q{i}": [np.cos(np.radians(i)), np.sin(np.radians(i))] for i in range(40)}
        table.update({f"a{i}": [np.cos(np.radians(i + offset)), np.sin(np.radians(i + offset))] for i in range(40)})
        return answer_reading(TableEncoder(table), [f"q{i}" for i in range(40)],
                              [f"a{i}" for i in range(40)], answered=[1] * 40)["on_topic"]
    assert reading(0.7) == [1] * 40
    assert reading(1.7) == [0] * 38 + [1, 1]


def test_answer_reading_with_the_sentence_encoder():
    requests = ["How do I bake banana bread?", "What causes the seasons on Earth?",
                "Name three famous painters and one work by each.", "Give me a fun fact about octopuses."]
    answers = ["Mash three ripe bananas, mix them with flour, sugar, butter and an egg, and bake for an hour.",
               "The seasons come from the tilt of the Earth's axis, which changes how directly sunlight falls.",
               "Octopuses are fascinating creatures of the sea. Octopuses live in the ocean.",  # drifted
               "An octopus has three hearts and blue blood."]
    encoder = SentenceEncoder(offline.judge_encoder_dir(), "cpu", max_length=64)
    reading = answer_reading(encoder, requests, answers, answered=[1, 1, 1, 0])
    assert reading["on_topic"] == [1, 1, 0, 1] and reading["kept"] == [1, 1, 0, 0]
