"""Answer normalization and majority vote shared by labels and the runtime."""

from router.vote import majority, vote_correct_fraction, vote_key


def test_vote_key_normalizes_numbers_and_text():
    assert vote_key("1,000.") == vote_key("1000.0") == "1000"
    assert vote_key(" $12 ") == "12"
    assert vote_key("0.50") == vote_key(".5")
    assert vote_key("  Hello   World ") == "hello world"
    assert vote_key("") is None and vote_key(None) is None


def test_majority_first_appearance_breaks_ties():
    assert majority(["b", "a", "a", "b"]) == ("b", ["b", "a"])
    assert majority([None, None]) == (None, [])
    assert vote_correct_fraction(["b", "a"], {"a"}) == 0.5
