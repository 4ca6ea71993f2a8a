"""Global CLI options: --version, and --verbose/--quiet mapped to the fuselip_med logger's level."""
import logging

import pytest
from typer.testing import CliRunner

import fuselip_med
from fuselip_med.cli import app
from fuselip_med.logs import configure_logging

runner = CliRunner()


@pytest.fixture()
def restore_logger():
    logger = logging.getLogger("fuselip_med")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fuselip-med {fuselip_med.__version__}"


@pytest.mark.parametrize("flags, level", [([], logging.INFO), (["--verbose"], logging.DEBUG), (["-v"], logging.DEBUG),
                                          (["--quiet"], logging.WARNING), (["-q"], logging.WARNING)])
def test_verbose_and_quiet_set_the_logging_level(restore_logger, flags, level):
    result = runner.invoke(app, [*flags, "info", "tiny"])
    assert result.exit_code == 0, result.output
    assert restore_logger.level == level
    assert sum(getattr(h, "_fuselip_med", False) for h in restore_logger.handlers) == 1


def test_verbose_and_quiet_together_are_refused(restore_logger):
    result = runner.invoke(app, ["--verbose", "--quiet", "info", "tiny"])
    assert result.exit_code == 2 and "--verbose and --quiet" in result.output


def test_configure_logging_is_idempotent_and_checks_the_level(restore_logger):
    configure_logging("debug")
    configure_logging(logging.WARNING)
    assert restore_logger.level == logging.WARNING
    assert sum(getattr(h, "_fuselip_med", False) for h in restore_logger.handlers) == 1
    with pytest.raises(ValueError, match="unknown logging level 'LOUD'"):
        configure_logging("LOUD")
