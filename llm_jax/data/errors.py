"""The one exception type of the data pipeline: bad input, named by file, line or config key."""


class DataError(ValueError):
  """Bad data or a data config value; the message names the file, line or key and what to do."""
