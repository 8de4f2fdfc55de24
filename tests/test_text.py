import numpy as np
import pytest

from model.errors import ConfigError
from model.text import render_prompt, template_fields


# ---------------------------------------------------------------- prompts

def test_prompt_fills_fields_and_joins_lists():
    out = render_prompt("The movie title is {title}; genres: {genres}.",
                        {"title": "Toy Story (1995)", "genres": ["Animation", "Comedy"]})
    assert out == "The movie title is Toy Story (1995); genres: Animation, Comedy."


@pytest.mark.parametrize("value", [None, float("nan"), np.float32("nan"), "", "  ", [], ()])
def test_prompt_missing_values_become_unknown(value):
    assert render_prompt("a={a} b={b}", {"a": value}) == "a=unknown b=unknown"


def test_prompt_keeps_zero_and_escaped_braces():
    assert render_prompt("{{literal}} {n}", {"n": 0}) == "{literal} 0"


def test_prompt_is_cut_at_max_chars():
    assert render_prompt("{t}", {"t": "x" * 5000}) == "x" * 4095
    assert render_prompt("ab {t}", {"t": "cdef"}, max_chars=4) == "ab c"


def test_template_fields():
    assert template_fields("{title} ({year}) {{not_a_field}} {title}") == {"title", "year"}
    assert template_fields("no placeholders") == set()


@pytest.mark.parametrize("bad", ["{title", "title}", "{0}", "{}", "{a.b}", "{a:>10}", "{a!r}"])
def test_malformed_template_names_the_template(bad):
    with pytest.raises(ConfigError, match="prompt template"):
        template_fields(bad)
