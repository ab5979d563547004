"""The one base class of every error nsoclip reports to its user.

An `NsoclipError` means the input (a flag, a file, a shard, a checkpoint, the launch) cannot be
used as given: the CLIs print its message as one `error:` line and exit 2. Any other exception is
a bug and keeps its traceback. Each module defines its own subclass beside the code that raises
it; this module imports nothing, so torch-free tools (the report) share it too."""


class NsoclipError(Exception):
    """Input nsoclip cannot use as given; the message names the flag, file or shard at fault."""
