class UserError(Exception):
    """A problem with the user's input or options: reported as one line, never as a traceback."""
