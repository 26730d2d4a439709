"""The package's single error family: the CLI turns any OssnetError into one line and exit code 2."""


class OssnetError(Exception):
    """Base class of every error ossnet raises on purpose (bad input, bad checkpoint, bad options)."""


class CaseError(OssnetError):
    """A case (image/label files) cannot be read or is inconsistent; the message names the file."""


class DatasetError(OssnetError):
    """A dataset folder has no recognisable layout or is inconsistent as a whole."""


class CheckpointError(OssnetError):
    """A checkpoint is missing, corrupt, or of another model kind than expected."""
