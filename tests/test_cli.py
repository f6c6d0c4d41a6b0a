import pytest
from click.testing import CliRunner

from runners.cli import main
from runners.options import parse_layers


def test_parse_layers():
    assert parse_layers("0.45,0.55") == (0.45, 0.55)
    assert parse_layers("13, 14") == [13, 14]
    assert parse_layers("-1") == [-1]
    with pytest.raises(Exception, match="two numbers"):
        parse_layers("0.1,0.2,0.3")
    with pytest.raises(Exception, match="comma-separated ints"):
        parse_layers("a,b")


@pytest.mark.parametrize("command", [[], ["extract"], ["steer"]])
def test_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_extract_then_steer(tmp_path):
    contexts = tmp_path / "contexts.txt"
    contexts.write_text("hi\nhello there\nwhat is up?\n")
    out = tmp_path / "v.safetensors"
    runner = CliRunner()
    result = runner.invoke(
        main, ["extract", "--model", "tiny-llama", "--contexts", str(contexts), "--layers", "1,2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "3 contexts" in result.output and out.exists()
    result = runner.invoke(
        main, ["steer", "--vector", str(out), "--prompt", "tell me a story", "--coeff", "50", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    assert "unsteered" in result.output and "steered (coeff 50)" in result.output


def test_extract_rejects_identical_personas(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            "tiny-llama",
            "--pos",
            "same",
            "--neg",
            "same",
            "--out",
            str(tmp_path / "v.safetensors"),
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip() == "Error: pos and neg personas are identical; the difference would be zero"
