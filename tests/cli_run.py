"""Running the rptq command in-process, and what a user error must look like."""
from click.testing import CliRunner

from rptq_cli.cli import main


def run(*args):
    """Invoke ``rptq ARGS...`` (each argument str()-ed) and return click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *words):
    """Exit code 2 and exactly one ``error:`` line, no traceback, naming every one of ``words``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]
