"""The error every artifact reader raises: a run directory, package or checkpoint that cannot be opened."""


class ArtifactError(ValueError):
  """A trained model cannot be opened; the message names the path, step or file and what to do."""
