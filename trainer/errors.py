"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""


def op_reason(error):
    """The line of a TensorFlow OpError that says what went wrong. Errors raised inside a
    tf.function start with 'Graph execution error:' and a Python stack; the reason follows."""
    lines = [line.strip() for line in error.message.splitlines()]
    reasons = [line for line in lines if line and not line.startswith(
        ("Graph execution error", "Detected at node", "File ", "[["))]
    return (reasons[-1] if reasons else lines[0])[:200]
