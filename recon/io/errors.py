"""The one exception bad particle input raises (and its one special case), and the one
transient cause of a read failure: a process out of file descriptors."""

from __future__ import annotations

import errno

__all__ = ["NotAParticleStack", "ParticleFileError", "out_of_descriptors"]

_EXHAUSTED = (errno.EMFILE, errno.ENFILE)


class ParticleFileError(ValueError):
    """A particle file (STAR, MRC) that cannot be used; the message is one clear line."""


class NotAParticleStack(ParticleFileError):
    """A well-formed MRC file that is a 3D map (header space group not 0), not a particle stack."""


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from or while handling, is 'too many open files'.

    Such a failure says nothing about the file: reading it again later may work. The
    readers turn an OSError into :class:`ParticleFileError` with the OSError kept as
    ``__cause__`` or ``__context__``; this walks that chain.
    """
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _EXHAUSTED:
            return True
        error = error.__cause__ or error.__context__
    return False
