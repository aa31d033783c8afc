"""edgekit's kernels: the backends of :mod:`edgekit.ops`, one module each, with their helpers.

| backend | module | helpers |
|---|---|---|
| ``torch`` | ``reference.py``: the pure-PyTorch reference, any device | ``edgekit.models.grn`` / ``deform`` |
| ``numba`` | ``numba_cpu.py``: Numba on the CPU | ``numba_grn.py``, ``numba_deform.py``, ``numba_layout.py``, ``numba_stream.py``, ``output_pool.py`` |
| ``numba-cuda`` | ``numba_cuda.py``: Numba CUDA | ``numba_cuda_kernels.py`` |
| ``cuda`` | ``cuda_cpp.py``: CUDA C++ (``cuda/*.cu``) | ``cuda_emulation.py`` (runs the .cu on the CPU for the tests) |
| ``auto`` | ``dispatch.py``: picks an available backend per call, or ``EDGEKIT_BACKEND`` | |
"""
