"""Every error class lives in ``qcelery.errors`` and stays importable where it used to be."""

import pytest

import qcelery.errors as errors
from qcelery.errors import QceleryError

OLD_HOMES = [
    ("qcelery.calendar", "OutOfCalendarError"),
    ("qcelery.serial", "SerializableConfigError"),
    ("qcelery.exp", "LoadObjectError"),
    ("qcelery.records", "RecordError"),
    ("qcelery.trainer", "TrainingFailedError"),
    ("qcelery.cli.checks", "TrackingUnavailableError"),
    ("qcelery.pit.errors", "PITQueryError"),
    ("qcelery.pit.errors", "PITFormatError"),
    ("qcelery.pit.errors", "PITDataNotFoundError"),
    ("qcelery.pit", "PITQueryError"),
]


@pytest.mark.parametrize("module, name", OLD_HOMES)
def test_error_imported_from_its_old_module_is_the_one_in_errors(module, name):
    old = getattr(__import__(module, fromlist=[name]), name)
    assert old is getattr(errors, name)
    assert issubclass(old, QceleryError)


def test_key_errors_print_their_message_unquoted():
    for klass in (errors.OutOfCalendarError, errors.SerializableConfigError, errors.TaskNotFoundError):
        assert str(klass("day 2031-01-01 is after the calendar")) == "day 2031-01-01 is after the calendar"
        assert isinstance(klass("x"), KeyError)
