"""Errors raised on bad input; each message names the file, the field and the fix."""


class InputError(ValueError):
    """Bad user input: the message says where (file, field) and how to fix it."""

    def __init__(self, source, field, problem, fix):
        self.source, self.field, self.problem, self.fix = str(source), field, problem, fix
        super().__init__(f"{self.source}: field '{field}': {problem}. Fix: {fix}")
