"""Errors a user can fix: the CLI prints their message on one line and exits non-zero."""


class UsageError(Exception):
    """Bad input (a config value, a file, a data set); the message names the problem and the fix."""


class DataError(UsageError):
    """The data set is missing, unreadable or not the shape CIFAR-10 should have."""
