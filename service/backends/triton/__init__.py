"""The production backend: NVIDIA Triton over gRPC (tritonclient's asyncio client).

:class:`~service.backends.triton.backend.TritonBackend` (``backend.py``) is what the gateway
holds: start, load and unload versions, run a batch, readiness and the health loop. It
composes plain parts, each with its own state: one batch's request, response and retries
(``inference.py``), which versions every Triton behind the target serves
(``model_control.py``), each version's metadata checked against its contract
(``metadata.py``), batches through system shared memory with a Triton on this host
(``shared_memory.py``), and what they all share about Triton's channels and errors
(``channels.py``).
"""
