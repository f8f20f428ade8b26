"""The bad-input errors the `sweep` command turns into one line and exit 2 (sweep/cli.py). They live here, apart
from the modules that raise them (data.py loads pyarrow, teacher.py torch and transformers), so that the command can
catch them without loading those: a refusal is said in well under a second."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message is one line naming the file and what was expected."""


class TeacherError(ValueError):
    """The teacher cannot be loaded or built; one line naming the source and what was expected."""
