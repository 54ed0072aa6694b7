"""Sampling in the runtime (temperature, top-k, top-p, seed) and stop strings, for ``run`` and ``CombinedModel``.

- the drawn frequencies match the distribution written out by hand (temperature, then top-k, then top-p) within
  five standard deviations, and a chooser that ignores the temperature (the broken twin) does not;
- top-k and top-p draw only from the tokens they keep; greedy stays the default, and temperature 0 or top-k 1 is
  greedy whatever the rest says;
- the same seed gives the same tokens on the tiny model, other seeds other tokens;
- a stop string ends the text where it first appears, streamed and returned alike (held back while it may still
  be forming across pieces: checked against the whole text for any split), and decoding stops there;
- bad values are one line naming the option.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from merge.cli import main as cli_main
from merge.errors import MergeError
from merge.runtime import CombinedModel, Sampling
from merge.runtime.sampling import StopScanner, TokenChooser, check_stop, cut_at_stop, probabilities, sample

LOGITS = np.array([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])
DRAWS = 20000


def _by_hand(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The expected distribution, written out plainly (sorted list, running sum)."""
    weights = {i: np.exp(v / temperature) for i, v in enumerate(logits)}
    ranked = sorted(weights, key=lambda i: -weights[i])
    if top_k:
        ranked = ranked[:top_k]
    total = sum(weights[i] for i in ranked)
    kept, running = [], 0.0
    for i in ranked:
        if running >= top_p:
            break
        kept.append(i)
        running += weights[i] / total
    p = np.zeros(len(logits))
    for i in kept:
        p[i] = weights[i]
    return p / p.sum()


def _frequencies(draw, n: int = DRAWS) -> np.ndarray:
    counts = np.bincount([draw() for _ in range(n)], minlength=len(LOGITS))
    return counts / n


def _agrees(freq: np.ndarray, p: np.ndarray, n: int = DRAWS) -> bool:
    """Every frequency within five standard deviations of its probability (and never a kept-out token drawn)."""
    sigma = np.sqrt(p * (1 - p) / n)
    return bool(np.all(np.abs(freq - p) <= 5 * sigma + 1e-12))


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0),
                                                               (1.0, 0, 0.8), (0.7, 4, 0.9)])
def test_draws_follow_the_distribution_written_by_hand(temperature, top_k, top_p):
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=7)
    expected = _by_hand(LOGITS, temperature, top_k, top_p)
    assert np.allclose(probabilities(LOGITS, sampling), expected)
    rng = np.random.default_rng(sampling.seed)
    freq = _frequencies(lambda: sample(LOGITS, sampling, rng))
    assert _agrees(freq, expected), (freq, expected)
    if top_k or top_p < 1:
        assert freq[expected == 0].sum() == 0  # never a token the filters left out


def test_twin_a_chooser_that_ignores_the_temperature_fails():
    asked = Sampling(temperature=0.5, seed=3)
    ignored = Sampling(temperature=1.0, seed=3)  # what a broken chooser would draw from
    rng = np.random.default_rng(3)
    freq = _frequencies(lambda: sample(LOGITS, ignored, rng))
    assert not _agrees(freq, _by_hand(LOGITS, asked.temperature))


def test_greedy_is_the_default_and_temperature_zero_or_top_k_one_is_greedy():
    logits = np.random.default_rng(0).standard_normal((4, 50))
    argmax = logits.argmax(-1)
    for sampling in (None, Sampling(), Sampling(temperature=0, top_p=0.1, seed=1), Sampling(temperature=5, top_k=1)):
        assert (TokenChooser(sampling, 4)(logits) == argmax).all()


def test_rows_draw_from_their_own_streams():
    """A row's draws depend on its own seed only, not on the rows beside it."""
    logits = np.tile(LOGITS, (3, 1))
    alone = TokenChooser(Sampling(temperature=1.0, seed=11), 1)
    together = TokenChooser([Sampling(temperature=1.0, seed=5), Sampling(temperature=1.0, seed=11), Sampling()], 3)
    for _ in range(50):
        assert together(logits)[1] == alone(logits[1:2])[0]


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"temperature": -1}, "temperature must be 0 (greedy) or more, got -1.0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"top_p": 0}, "top_p must be more than 0 and at most 1, got 0.0"),
    ({"top_p": 1.5}, "top_p must be more than 0 and at most 1, got 1.5"),
    ({"top_k": -2}, "top_k must be a whole number"),
    ({"top_k": 2.5}, "top_k must be a whole number"),
    ({"seed": -1}, "seed must be a whole number from 0"),
    ({"seed": True}, "seed must be a whole number from 0"),
])
def test_bad_sampling_values_are_one_line(kwargs, expected):
    with pytest.raises(MergeError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        Sampling(**kwargs)


@pytest.mark.parametrize(("stop", "expected"), [([""], "stop strings must be non-empty"), (["x"] * 17, "at most 16"),
                                                ([3], "stop strings must be non-empty strings, got 3"),
                                                (["a" * 300], "a stop string of 300 characters")])
def test_bad_stop_strings_are_one_line(stop, expected):
    with pytest.raises(MergeError, match=expected):
        check_stop(stop)


# -- stop strings ------------------------------------------------------------------------------------------------

def test_a_stop_string_split_across_pieces_is_never_shown():
    scanner = StopScanner(["<end>"])
    shown = [scanner.feed(p) for p in ["Hello <", "e", "nd", "> more"]]
    assert "".join(shown) == "Hello " and scanner.stopped and scanner.flush() == ""
    scanner = StopScanner(["<end>"])
    shown = [scanner.feed(p) for p in ["a <", "e", "x"]] + [scanner.flush()]
    assert "".join(shown) == "a <ex" and not scanner.stopped  # held back, then shown once it could not be one


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab<>é", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stop=st.lists(st.text(alphabet="ab<>é", min_size=1, max_size=4), min_size=1, max_size=3))
def test_streamed_text_equals_the_cut_text_for_any_split(text, cuts, stop):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    scanner = StopScanner(stop)
    shown = "".join(scanner.feed(p) for p in pieces) + scanner.flush()
    expected, found = cut_at_stop(text, stop)
    assert shown == expected and scanner.stopped == found


# -- on the tiny model -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(combined):
    return CombinedModel(combined("tiny"))


def test_the_same_seed_gives_the_same_tokens(model):
    hot = dict(temperature=50.0, top_k=200)
    runs = [model.complete("Tell me a story.", max_new_tokens=12, sampling=Sampling(**hot, seed=s))
            for s in (1, 1, 2)]
    tokens = [r.generation.tokens.tolist() for r in runs]
    assert tokens[0] == tokens[1]
    assert tokens[0] != tokens[2]  # 12 draws from ~200 near-equal tokens: equal by chance ~1e-27
    greedy = model.complete("Tell me a story.", max_new_tokens=12)
    assert tokens[0] != greedy.generation.tokens.tolist()
    assert model.complete("Tell me a story.", max_new_tokens=12,
                          sampling=Sampling(temperature=50.0, top_k=1, seed=9)).texts == greedy.texts


def test_a_stop_string_ends_the_text_and_the_decoding(model):
    full = model.complete("Tell me a story.", max_new_tokens=24)
    text = full.texts[0]
    assert full.finish_reasons == ["length"]
    middle = text.strip()[:3]
    assert middle and text.find(middle) > 0, text  # the test needs a stop string inside the text
    streamed: list[str] = []
    cut = model.complete("Tell me a story.", max_new_tokens=24, stop=["@@never@@", middle],
                         stream=lambda _row, piece: streamed.append(piece))
    assert cut.texts == [text[:text.find(middle)]] == ["".join(streamed)]
    assert cut.finish_reasons == ["stop"]
    assert cut.generation.tokens.shape[1] < 24  # decoding ended at the stop string


def test_run_samples_with_a_seed_and_refuses_bad_options(combined, capsys):
    folder = str(combined("tiny"))
    argv = ["run", folder, "--prompt", "Tell me a story.", "--max-new-tokens", "8", "--temperature", "50",
            "--top-k", "200", "--seed", "4"]
    outputs = []
    for _ in range(2):
        assert cli_main(argv) == 0
        outputs.append(capsys.readouterr().out.rsplit("vision+prefill", 1)[0])
    assert outputs[0] == outputs[1]
    assert cli_main(["run", folder, "--prompt", "x", "--top-p", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --top-p must be more than 0 and at most 1, got 0.0"]
