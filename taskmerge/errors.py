"""The one exception type for mistakes in the user's input (an option, a value, a file).

Entry points report a `UserError` as one line naming the culprit and what was expected, with no traceback
(`HYDRA_FULL_ERROR=1` shows it); anything else is a bug and keeps its traceback. It subclasses `ValueError`
so callers that already catch bad values keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad option, value or file supplied by the user; the message names it and says what is expected."""
