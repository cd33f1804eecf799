"""The errors artifact readers raise: a run directory, package or checkpoint that cannot be opened."""


class ArtifactError(ValueError):
  """A trained model cannot be opened; the message names the path, step or file and what to do."""


class PackageError(ArtifactError):
  """A package is missing, damaged, or from a format this version cannot read; names the file."""
