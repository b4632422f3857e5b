"""The one exception the export CLI turns into a one-line reason and a non-zero exit."""


class ExportError(Exception):
    """A problem with the user's input or environment, stated in one line."""
