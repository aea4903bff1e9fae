"""Strict, atomic tooling for the quilt series in ``patches/<engine>-<pin>/``.

Stdlib only (plus the ``git`` binary). Modules by concern:

* ``engines``   the engines, their pins and where their series, new-file sources and release cache live
* ``patchfile`` one git-style patch: parse, DEP-3 header; ``series``: the series file and its patches
* ``simulate``  the strict in-memory applier (exact line numbers, no fuzz/offset) and per-patch status
* ``apply``     apply / check / reverse / status of a target, replayed with ``git apply`` on staged copies
* ``commit``    swap files in atomically, the state file beside the patched package
* ``targets``   find the package and its version behind ``--python`` or ``--tree``
* ``releases``  the cached clean pinned releases and ``verify``
* ``gendiff``   one stable ``diff --git`` block; ``newfiles``: new-file hunks generated from ``files/``
* ``refresh``   regenerate patches from an edited tree; ``lint``: series and patch checks
* ``cli``       ``moe-routes patch ...`` / ``moe-routes verify``
"""
