"""Simulated disk full for ``benchmarks/fault_injection.py`` where no tmpfs can be mounted: the
N-th raster or GeoPackage write of this process (``SARMAE_FAULT_WRITE_AT``) raises ENOSPC; GDAL
and SQLite still do every other write. Only on PYTHONPATH for the benchmark's subprocesses."""

import errno
import os

_AT = int(os.environ.get("SARMAE_FAULT_WRITE_AT", "0"))

if _AT > 0:
    import fiona
    import rasterio.io

    _calls = [0]

    def _failing(real):
        def write(*args, **kwargs):
            _calls[0] += 1
            if _calls[0] == _AT:
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            return real(*args, **kwargs)
        return write

    rasterio.io.DatasetWriter.write = _failing(rasterio.io.DatasetWriter.write)
    fiona.Collection.writerecords = _failing(fiona.Collection.writerecords)
