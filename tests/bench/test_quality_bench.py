"""The quality bench's variant spelling: ``method+option[:value]+...`` to the ``alps prune`` options."""

from __future__ import annotations

import pytest

from bench.quality_bench import variant_options


def test_variants_spell_the_prune_options():
    assert variant_options("alps") == ("alps", [])
    assert variant_options("alps+dense:0.5+refine") == ("alps", ["--targets", "dense", "--target-mix", "0.5",
                                                                 "--refine", "adam"])
    assert variant_options("wanda+owl:0.1+refine:3") == ("wanda", ["--allocation", "owl", "--allocation-spread",
                                                                   "0.1", "--refine", "adam", "--refine-epochs", "3"])


def test_an_unknown_option_stops_before_any_work():
    with pytest.raises(SystemExit, match="unknown option 'teacher'"):
        variant_options("alps+teacher")
