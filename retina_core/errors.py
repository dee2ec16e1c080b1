"""The one exception type for problems a user can cause (bad file, wrong modality, missing weights).

Its message is written for a clinician: what went wrong and what to do next. Tracebacks stay in logs.
"""


class RetinaInputError(ValueError):
    """A user-caused error with a message a clinician can act on."""


class ServerBusyError(RetinaInputError):
    """The shared inference service cannot take or finish a request now (its queue is full, or the wait ran out):
    the user should retry in a few seconds. A RetinaInputError, so every page shows it as it shows a bad file."""
