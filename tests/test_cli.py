"""The ``clipkit`` console script: help texts and dispatch errors."""

import pytest

from clipkit.cli import main


def test_top_level_help_shows_a_workflow(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "embed", "index", "serve"):
        assert f"\n    {cmd} " in out
    assert "clipkit index --embeddings emb/ --output emb/index --audit 200" in out


def test_command_help_carries_its_module_docs_without_rst_marks(capsys):
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    out = capsys.readouterr().out
    assert "--add     # another data set" in out
    assert "``" not in out


def test_unknown_command_prints_help_and_exits_2(capsys):
    assert main(["nope"]) == 2
    assert "COMMAND" in capsys.readouterr().out
