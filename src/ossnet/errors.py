"""The package's single error family: the CLI turns any OssnetError into one line and exit code 2."""


class OssnetError(Exception):
    """Base class of every error ossnet raises on purpose (bad input, bad checkpoint, bad options)."""


class CaseError(OssnetError):
    """A case (image/label files) cannot be read or is inconsistent; the message names the file."""


class DatasetError(OssnetError):
    """A dataset folder has no recognisable layout or is inconsistent as a whole."""


class CheckpointError(OssnetError):
    """A checkpoint is missing, corrupt, or of another model kind than expected."""


class AgreedError(OssnetError):
    """An error every rank of a torchrun job raises alike, having agreed on it (outputs that exist, say): only
    the rank that `reports` it prints it, so that the user reads it once; every rank exits with code 2."""

    def __init__(self, message: str, reports: bool = True) -> None:
        super().__init__(message)
        self.reports = reports
