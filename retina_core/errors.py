"""The one exception type for problems a user can cause (bad file, wrong modality, missing weights).

Its message is written for a clinician: what went wrong and what to do next. Tracebacks stay in logs.
"""


class RetinaInputError(ValueError):
    """A user-caused error with a message a clinician can act on."""
